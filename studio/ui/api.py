"""The app's programmatic API (gradio_client, curl): a few named endpoints with typed parameters over
the same ``Studio`` methods the page uses. Everything else the page does is kept off the API.

Each caller is who the server says it is (its verified login; "local" without one), never a value it sends.
"""

from __future__ import annotations

import gradio as gr
from gradio.data_classes import FileData

from studio.ui.common import friendly, visitor

API_NAMES = ("describe_model", "upload_data", "inspect_data", "start_training", "stop_training", "resume_training",
             "run_status", "list_runs", "chat", "export_run")


def register(studio) -> None:
    @friendly
    def describe_model(name: str = "bundled") -> dict:
        """What a model is, its LoRA-able layer names, and a memory estimate per method."""
        return studio.describe_model(name)

    @friendly
    def upload_data(file: FileData, request: gr.Request) -> dict:
        """Store a data file for this session; returns {"data_path": ...} to pass as data.path.
        (Not a bare "path" key: clients would take the dict for a file to download.)"""
        return {"data_path": studio.store_upload(file["path"], visitor(request), remove_source=True)}

    @friendly
    def inspect_data(data: dict, model: str = "bundled", page: int = 0, request: gr.Request = None) -> dict:
        """Read and check data settings ({path, format, columns, max_length, ...}): format, preview, lengths."""
        return studio.inspect_data(data, model, visitor(request), page=page)

    @friendly
    def start_training(config: dict, request: gr.Request) -> dict:
        """Start a run from a config dict ({name, model, data, method, training}); returns its run id."""
        return studio.start(config, visitor(request))

    @friendly
    def stop_training(request: gr.Request) -> str:
        """Ask the training run to stop after its current step (the adapter is saved)."""
        return studio.stop(visitor(request))

    @friendly
    def resume_training(run_id: str, request: gr.Request) -> str:
        """Continue an interrupted (or stopped) run from its last complete checkpoint."""
        return studio.resume(run_id, visitor(request))

    @friendly
    def run_status(run_id: str = "") -> dict:
        """Status and metrics so far of a run (default: the one training now)."""
        return studio.snapshot(run_id or None)

    @friendly
    def list_runs() -> list:
        """All runs, newest first."""
        return studio.runs_table()

    @friendly
    def chat(run_id: str, message: str, source: str = "merged", max_new_tokens: int = 128,
             temperature: float = 0.0) -> str:
        """Stream a reply from a run's model (source: merged, adapter or base) to one message."""
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        yield from studio.chat(source, run_id or None, [{"role": "user", "content": message}], settings)

    @friendly
    def export_run(run_id: str, what: str = "adapter") -> FileData:
        """A zip of the run's adapter ('adapter') or merged model ('merged')."""
        return FileData(path=studio.export(run_id, what))

    for fn in (describe_model, upload_data, inspect_data, start_training, stop_training, resume_training, run_status,
               list_runs):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None if fn in (run_status, list_runs, stop_training)
               else "default", concurrency_id=None if fn in (run_status, list_runs, stop_training) else "heavy")
    gr.api(chat, api_name="chat", concurrency_id="heavy")
    gr.api(export_run, api_name="export_run", concurrency_id="heavy")


def hide_page_events(app: gr.Blocks) -> None:
    """Page events take dozens of unnamed inputs; keep them out of the API docs and client libraries."""
    for fn in app.fns.values():
        if fn.api_name not in API_NAMES:
            fn.api_visibility = "private"
