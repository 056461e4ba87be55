"""Export tab: download the adapter or the merged model as a zip, and the code that loads each.

Run it alone with ``python -m studio.ui.export_tab``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.ui.common import bind, friendly, run_alone, run_picker, visitor


def finished_runs(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    return run_picker(studio.finished_runs(visitor(request)), current)


@friendly
def make(studio, run_id: str, what: str, current: list | None, request: gr.Request = None) -> list:
    """Zip `what` ('adapter' or 'merged') of a run; the downloads list with it (replacing an older one)."""
    if not run_id:
        raise gr.Error("Pick a run first.")
    path = studio.export(run_id, what, visitor(request))
    kept = [f for f in (current or []) if not str(f).endswith(f"-{what}.zip")]
    return [*kept, path]


@friendly
def snippets(studio, run_id: str, request: gr.Request = None) -> tuple[str, str]:
    if not run_id:
        return "", ""
    s = studio.load_snippets(run_id, visitor(request))
    return s["adapter"], s["merged"]


def build(studio) -> SimpleNamespace:
    gr.Markdown("### 5. Take it with you\nThe **adapter** is small and needs the base model; the **merged model** "
                "is a complete model that loads anywhere transformers runs.")
    with gr.Row():
        run_pick = gr.Dropdown([], label="Run", scale=3, elem_id="export-run")
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        zip_adapter = gr.Button("Zip the adapter", elem_id="export-adapter")
        zip_merged = gr.Button("Zip the merged model", elem_id="export-merged")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="export-files")
    with gr.Row():
        adapter_code = gr.Code(language="python", label="Load the adapter", interactive=False)
        merged_code = gr.Code(language="python", label="Load the merged model", interactive=False)

    def make_adapter(run_id: str, current: list | None, request: gr.Request):
        return make(studio, run_id, "adapter", current, request)

    def make_merged(run_id: str, current: list | None, request: gr.Request):
        return make(studio, run_id, "merged", current, request)
    zip_adapter.click(make_adapter, [run_pick, files], files, concurrency_id="export")
    zip_merged.click(make_merged, [run_pick, files], files, concurrency_id="export")
    run_pick.change(bind(snippets, studio), run_pick, [adapter_code, merged_code])
    refresh.click(bind(finished_runs, studio), run_pick, run_pick)
    return SimpleNamespace(run_pick=run_pick, refresh=refresh, files=files)


if __name__ == "__main__":
    run_alone(build, "Export")
