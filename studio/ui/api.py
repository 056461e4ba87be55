"""The app's programmatic API (gradio_client, curl): a few named endpoints with typed parameters over
the same ``Studio`` methods the page uses. Everything else the page does is kept off the API.

Each caller is who the server says it is (its verified login; "local" without one), never a value it sends.
"""

from __future__ import annotations

import gradio as gr
from gradio.data_classes import FileData

from studio.ui.common import friendly, visitor

API_NAMES = ("describe_model", "upload_data", "inspect_data", "start_training", "stop_training", "resume_training",
             "delete_run", "run_status", "list_runs", "chat", "export_run", "start_evaluation", "evaluation_report")
# Each group runs one call at a time, apart from the others: a long chat reply never holds up a data check.
QUICK = None  # status, lists and Stop answer at once


def register(studio) -> list:
    """Add the named endpoints; returns their functions (hide_page_events keeps only these public)."""
    @friendly
    def describe_model(name: str = "bundled") -> dict:
        """What a model is, its LoRA-able layer names, and a memory estimate per method."""
        return studio.describe_model(name)

    @friendly
    def upload_data(file: FileData, request: gr.Request) -> dict:
        """Store a data file for this caller; returns {"data_path": NAME}, the name to pass as data.path.
        (Not a bare "path" key: clients would take the dict for a file to download.)"""
        return {"data_path": studio.store_upload(file["path"], visitor(request), remove_source=True)}

    @friendly
    def inspect_data(data: dict, model: str = "bundled", page: int = 0, stage: str = "sft",
                     template_system_prompt: str = "leave_out", request: gr.Request = None) -> dict:
        """Read and check data settings ({path, format, columns, max_length, ...}) for the rows `stage` reads
        (sft, dpo, kto, grpo...): format, preview, lengths; the sample rendered with the model's own system prompt
        left out or kept (leave_out / keep, as model.template_system_prompt)."""
        return studio.inspect_data(data, model, visitor(request), page=page, stage=stage,
                                   template_system_prompt=template_system_prompt)

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
    def delete_run(run_id: str, request: gr.Request) -> str:
        """Delete a run that is not training, with its adapter and checkpoints."""
        return studio.delete(run_id, visitor(request))

    @friendly
    def run_status(run_id: str = "", request: gr.Request = None) -> dict:
        """Status and metrics so far of a run (default: the one training now)."""
        return studio.snapshot(run_id or None, visitor(request))

    @friendly
    def list_runs(request: gr.Request = None) -> list:
        """Your runs, newest first."""
        return studio.runs_table(visitor(request))

    @friendly
    def chat(run_id: str, message: str, source: str = "merged", max_new_tokens: int = 128,
             temperature: float = 0.0, request: gr.Request = None) -> str:
        """Stream a reply from a run's model (source: merged, adapter or base) to one message."""
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        yield from studio.chat(source, run_id or None, [{"role": "user", "content": message}], settings,
                               visitor(request))

    @friendly
    def export_run(run_id: str, what: str = "adapter", request: gr.Request = None) -> FileData:
        """A zip of one export of the run: 'adapter', 'merged', 'gguf-f16', 'gguf-bf16', 'gguf-q8_0' or 'gguf-q4_k_m'
        (a GGUF is loaded back and checked; its export.json inside says what was checked)."""
        return FileData(path=studio.export(run_id, what, visitor(request)))

    @friendly
    def start_evaluation(settings: dict, request: gr.Request) -> dict:
        """Evaluate a finished run against its base or another run ({run, against, data, metrics, max_rows,
        forgetting, ...}); returns the evaluation's run id (follow it with run_status)."""
        return studio.start_evaluation(settings, visitor(request))

    @friendly
    def evaluation_report(run_id: str, request: gr.Request = None) -> dict:
        """The report of a finished evaluation ({} while it runs)."""
        return studio.evaluation_report(run_id, visitor(request))

    groups = {describe_model: "model", upload_data: "data", inspect_data: "data", start_training: "start",
              stop_training: QUICK, resume_training: "start", delete_run: "start", run_status: QUICK,
              list_runs: QUICK, chat: "chat", export_run: "export", start_evaluation: "start",
              evaluation_report: QUICK}
    for fn, group in groups.items():
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None if group is QUICK else "default",
               concurrency_id=group)
    return list(groups)


def hide_page_events(app: gr.Blocks, endpoints: list) -> None:
    """Page events take dozens of unnamed inputs; keep them out of the API docs and client libraries. A page
    handler whose name an endpoint also has must not take the endpoint's name: each endpoint gets its own."""
    by_name = {fn.__name__: fn for fn in endpoints}
    for block_fn in app.fns.values():
        if block_fn.fn in endpoints:
            block_fn.api_name = block_fn.fn.__name__
        else:
            block_fn.api_visibility = "private"
            if block_fn.api_name in by_name:
                block_fn.api_name = f"page_{block_fn.api_name}"
