"""Export tab: a run as an adapter, a merged model or a GGUF for llama.cpp and Ollama, each a zip with a model card;
a GGUF is loaded back and checked, and the page says what was checked or what failed.

Run it alone with ``python -m studio.ui.export_tab``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio.ui.common import bind, friendly, run_alone, run_picker, visitor

INTRO = ("### 5. Take it with you\nThe **adapter** is small and needs the base model; the **merged model** is a "
         "complete model that loads anywhere transformers runs; a **GGUF** runs in llama.cpp and Ollama (a Modelfile "
         "comes with it). Every download has a model card (README.md) and the run's evaluation reports. A GGUF is "
         "loaded back with llama.cpp before you get it: its chat template, its tokens, where it stops and (f16, "
         "bf16, q8_0) its reply are checked against the trained model. On a CPU a GGUF export takes a minute or "
         "more for a small model.")


def finished_runs(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    return run_picker(studio.finished_runs(visitor(request)), current)


def check_text(result: dict) -> str:
    """The export's outcome as Markdown: 'verified' and what was checked, or what failed."""
    if result.get("verified") is None:
        return f"**Exported.** {result['summary'].splitlines()[0]}"
    lines = ["**Verified**: loaded back with llama.cpp, and:" if result["verified"] else
             "**Not verified**: loaded back with llama.cpp, and a check failed:"]
    for check in result["checks"]:
        mark = {True: "passed", False: "**FAILED**", None: "shown"}[check["passed"]]
        lines.append(f"- {check['name']} {mark}: {check['detail']}")
    lines.append("\n" + result["summary"].splitlines()[0])
    return "\n".join(lines)


@friendly
def make(studio, run_id: str, what: str, current: list | None, request: gr.Request = None) -> tuple[list, str]:
    """Export `what` (a format name) of a run; the downloads list with it (replacing an older one of that format)
    and what the check found."""
    if not run_id:
        raise gr.Error("Pick a run first.")
    if not what:
        raise gr.Error("Pick a format first.")
    result = studio.export_with_report(run_id, what, visitor(request))
    kept = [f for f in (current or []) if not str(f).endswith(f"-{what}.zip")]
    return [*kept, result["path"]], check_text(result)


@friendly
def snippets(studio, run_id: str, request: gr.Request = None) -> tuple[str, str]:
    if not run_id:
        return "", ""
    s = studio.load_snippets(run_id, visitor(request))
    return s["adapter"], s["merged"]


def gguf_status(studio) -> str:
    missing = studio.gguf_missing()
    return f"**GGUF export is not available here.** {missing}" if missing else ""


def build(studio) -> SimpleNamespace:
    gr.Markdown(INTRO)
    with gr.Row():
        run_pick = gr.Dropdown([], label="Run", scale=3, elem_id="export-run")
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        zip_adapter = gr.Button("Zip the adapter", elem_id="export-adapter")
        zip_merged = gr.Button("Zip the merged model", elem_id="export-merged")
    with gr.Row():
        fmt = gr.Dropdown(studio.export_formats(), value="gguf-q8_0", label="Or pick a format", scale=3,
                          elem_id="export-format")
        go = gr.Button("Export", variant="primary", scale=1, elem_id="export-go")
    gr.Markdown(gguf_status(studio), elem_id="export-gguf-status")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="export-files")
    checked = gr.Markdown("", elem_id="export-check")
    with gr.Row():
        adapter_code = gr.Code(language="python", label="Load the adapter", interactive=False)
        merged_code = gr.Code(language="python", label="Load the merged model", interactive=False)

    def make_adapter(run_id: str, current: list | None, request: gr.Request):
        return make(studio, run_id, "adapter", current, request)

    def make_merged(run_id: str, current: list | None, request: gr.Request):
        return make(studio, run_id, "merged", current, request)

    def make_chosen(run_id: str, what: str, current: list | None, request: gr.Request):
        return make(studio, run_id, what, current, request)
    # One export at a time per server (concurrency_id): a GGUF export keeps the CPU busy for minutes, and the
    # page's other events (chat, training's progress) keep answering meanwhile.
    zip_adapter.click(make_adapter, [run_pick, files], [files, checked], concurrency_id="export")
    zip_merged.click(make_merged, [run_pick, files], [files, checked], concurrency_id="export")
    go.click(make_chosen, [run_pick, fmt, files], [files, checked], concurrency_id="export")
    run_pick.change(bind(snippets, studio), run_pick, [adapter_code, merged_code])
    refresh.click(bind(finished_runs, studio), run_pick, run_pick)
    return SimpleNamespace(run_pick=run_pick, refresh=refresh, files=files, fmt=fmt, checked=checked)


if __name__ == "__main__":
    run_alone(build, "Export")
