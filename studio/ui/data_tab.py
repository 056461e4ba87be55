"""Data tab: upload or pick the demo set, see how it was read, preview it, and see one sample exactly as
the model will (trained tokens highlighted), with a token-length histogram and the bad-row report. Columns the
studio mapped by itself show in the column pickers (to change); placeholders found ({{name}}) ask for values.

Run it alone with ``python -m studio.ui.data_tab``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.config import BUNDLED_MODEL, DEMO_DATA
from studio.data_summary import lines as data_lines
from studio.data_summary import run_kind
from studio.placeholders import parse_values
from studio.ui.common import Form, bind, friendly, run_alone, visitor

NONE = "(none)"
DEMO_SOURCE = "Using: **demo set**"


def data_settings(form_values: dict, path: str, prompt_col: str, reply_col: str, system_col: str,
                  placeholder_values: str = "", role_names: str = "", mix_files: str = "") -> dict:
    """The data section of a config from the tab's fields: its settings, the file, the column mapping, the
    placeholder values ('name: Ada' lines), the role mapping ('bot: assistant' lines) and the files to mix in
    ('general.jsonl: 0.2' lines)."""
    mapping = {}
    for col, target in ((prompt_col, "instruction"), (reply_col, "output"), (system_col, "system")):
        if col and col != NONE and col != target:
            mapping[col] = target
    return {**form_values, "columns": mapping, "path": path, "placeholders": parse_values(placeholder_values),
            "roles": parse_values(role_names), "mix": parse_values(mix_files)}


@friendly
def check(studio, data: dict, model: str, page: int, request: gr.Request = None, stage: str = "sft",
          template_system: str = "leave_out") -> dict:
    """What the tab shows for the data settings, read as the rows `stage` trains on: summary text, preview,
    sample (and a pair's rejected reply; rendered with the model's own system prompt as `template_system` says),
    histogram, bad rows, columns."""
    d = studio.inspect_data(data, model or BUNDLED_MODEL, visitor(request), page=int(page or 1) - 1, stage=stage,
                            template_system_prompt=template_system)
    over = d["over_max_length"]
    policy = "cut to fit" if d["too_long"] == "truncate" else "dropped"
    kind = data_kind_line(d.get("format"), stage)
    if d.get("format") == "text":
        policy = "split into blocks of max length (nothing is lost)"
    about = "about " if d.get("estimated") else ""
    text = (f"**{d['summary']}**  \n" + (f"{kind}  \n" if kind else "")
            + f"{d['split']}.  \n{about}{d['trained_tokens']:,} tokens to learn from. "
            f"{about}{over} rows are longer than max length {d['max_length']} and will be {policy}. "
            f"Page {d['page'] + 1} of {d['pages']}.")
    details = dict(d.get("details") or {})
    # The 'Data: ...' line repeats the summary and the kind of run is said above.
    shown = [line for line in data_lines({**details, "file": d["file"]})
             if not line.startswith(("Data: ", "Kind of run: "))]
    dup = d.get("duplicates") or {}
    if dup.get("exact") or dup.get("near"):
        shown.append(f"Repeated rows: {dup['exact']} exact, {dup['near']} near copies (data.dedup decides whether "
                     "they are removed). Most repeated: " + "; ".join(f"{g['copies']} x \"{g['text'][:60]}\""
                                                                     for g in dup.get("groups", [])[:3]))
    if shown:
        text += "  \n" + "  \n".join(shown)
    mapping = details.get("mapping") or {}
    chosen = {target: column for column, target in mapping.items()}
    found = list(details.get("placeholders") or {})
    ask = ("Placeholders found: " + ", ".join("{{" + n + "}}" for n in found) + ". Give each a value, one per line "
           "(e.g. name: Ada).") if found else "Placeholder values (only if your examples hold {{name}}-style ones)"
    return {"summary": text, "preview": pd.DataFrame(d["preview"]), "sample": d["sample"],
            "sample_rejected": d.get("sample_rejected"), "histogram": histogram(d["lengths"]),
            "columns": [NONE, *d["columns"]], "bad": pd.DataFrame(d["bad_rows"] or [{"row": "-", "reason": "none"}]),
            "mapped": {k: chosen.get(k, NONE) for k in ("instruction", "output", "system")},
            "placeholders_label": ask, "tool_sample": d.get("tool_sample")}


def data_kind_line(fmt: str | None, stage: str = "sft") -> str:
    """The kind of run this data makes, said when it has a name of its own: plain text read for supervised
    fine-tuning ('What to train': SFT) is continued pretraining."""
    if (stage or "sft") != "sft" or not run_kind(fmt):
        return ""
    name, explanation = run_kind(fmt)
    return (f"Plain text detected, so this is a **{name}** run: {explanation}. Start trains it as it is (What to "
            "train: supervised fine-tuning, which reads plain text this way).")


@friendly
def uploaded(studio, file: str | None, request: gr.Request = None) -> tuple[str, str, str | None]:
    """(the stored upload's name to train on, the source line, the name for the browser to remember); the demo
    set (and nothing to remember) when the upload is cleared."""
    if file is None:
        return DEMO_DATA, DEMO_SOURCE, None
    stored = studio.store_upload(file, visitor(request), remove_source=True)
    return stored, f"Using: **{stored}**", stored


@friendly
def remembered(studio, name, request: gr.Request = None) -> tuple:
    """On page load: the upload this browser used last (kept in its local storage), when it is still one of this
    visitor's own uploads: (its name, the source line). The stored value comes from the browser and may be
    forged: anything else (a path, another visitor's upload, one removed since) is not used and not echoed, and
    the page stays on the demo set."""
    if name in (None, ""):
        return gr.skip(), gr.skip()
    own = studio.own_upload(name, visitor(request))
    if own is None:
        return DEMO_DATA, DEMO_SOURCE
    return own, f"Using: **{own}**"  # as the upload said it (this also runs right after an upload)


MIX_SHARE = 0.2  # a typical share of general data against forgetting (data.mix's help)


def add_mix_line(mix_text: str, name: str, share: float = MIX_SHARE) -> str:
    """The 'file: share' lines of data.mix with `name` added (once), keeping what the person typed."""
    lines = [line for line in (mix_text or "").splitlines() if line.strip()]
    if any(line.split(":", 1)[0].strip() == name for line in lines):
        return "\n".join(lines)
    return "\n".join([*lines, f"{name}: {share:g}"])


@friendly
def your_uploads(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    """The visitor's own uploads, to pick a file to mix in (in share mode a name is all they can give)."""
    names = studio.uploads_of(visitor(request))
    return gr.Dropdown(choices=names, value=current if current in names else None)


@friendly
def mix_upload(studio, file: str | None, mix_text: str, request: gr.Request = None) -> tuple:
    """A second file uploaded to mix in: stored in the visitor's folder like the first, and added to the
    'file: share' lines under the name it was stored as; (mix lines, the upload picker)."""
    if file is None:
        return gr.skip(), gr.skip()
    stored = studio.store_upload(file, visitor(request), remove_source=True)
    return add_mix_line(mix_text, stored), your_uploads(studio, stored, request)


@friendly
def mix_pick(studio, name: str | None, mix_text: str, request: gr.Request = None) -> str:
    """One of the visitor's own uploads picked to mix in: added to the 'file: share' lines. Only names of their own
    uploads are taken (the pick comes from the client)."""
    own = studio.own_upload(name, visitor(request))
    if own is None:
        raise gr.Error("Pick one of your own uploads to mix in.")
    return add_mix_line(mix_text, own)


DEMO_BY_KIND = {"conversations": DEMO_DATA, "preference_pairs": "demo-dpo", "feedback": "demo-dpo",
                "prompts": "demo-grpo"}


def demo_for(stage: str) -> tuple[str, str]:
    """The demo data set for the rows `stage` reads, and the source line."""
    from studio import stages
    name = DEMO_BY_KIND[stages.get(stage or "sft").data_kind]
    return name, f"Using: **{'demo set' if name == DEMO_DATA else name + ' demo set'}**"


def follow_stage(stage: str, path: str) -> tuple:
    """When the stage to train changes while a demo set is in use, the demo set for that stage's rows; a file
    of the person's own stays (the check then says whether that stage can read it)."""
    from studio.data import is_demo
    return demo_for(stage) if is_demo(path) else (gr.skip(), gr.skip())


def build(studio, model_picker=None, stage=None) -> SimpleNamespace:
    """`stage`: the component holding the stage to train (its kind of rows decides how the file is read)."""
    gr.Markdown("### 2. Give it examples\nUpload .jsonl, .json, .csv or .parquet in any common format: "
                "conversations (alpaca, sharegpt, messages with text parts and tool calls, prompt/completion, "
                "Open-Assistant trees) for supervised fine-tuning; plain text (.txt, .md or a 'text' column) for "
                "continued pretraining; "
                "pairs of a chosen and a rejected reply for DPO, ORPO, SimPO or a reward model; replies labelled good "
                "or bad for KTO; prompts (with an optional reference answer) for GRPO. Or use the demo set.")
    form = Form()
    data_path = gr.State(DEMO_DATA)
    # The upload's name, kept in this browser's local storage so a reload keeps training on it (checked against
    # the visitor's own uploads when the page loads: see `remembered`).
    last_upload = gr.BrowserState(None, storage_key="studio-data-upload")
    model_picker = model_picker if model_picker is not None else gr.State(BUNDLED_MODEL)
    stage = stage if stage is not None else gr.State("sft")
    with gr.Row():
        upload = gr.File(label=f"Upload data (up to {studio.policy.max_upload_mb} MB)", file_count="single",
                         file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt", ".md"], elem_id="data-upload",
                         scale=2)
        with gr.Column(scale=1):
            use_demo = gr.Button("Use the demo set for what you train", elem_id="data-demo")
            source = gr.Markdown(DEMO_SOURCE, elem_id="data-source")
    with gr.Row():
        form.field("data", "format", label="Format")
        prompt_col = gr.Dropdown([NONE], value=NONE, label="Prompt column", allow_custom_value=False,
                                 info="Flat files: which column holds the question or instruction.")
        reply_col = gr.Dropdown([NONE], value=NONE, label="Reply column", info="Which column holds the answer to learn.")
        system_col = gr.Dropdown([NONE], value=NONE, label="System column", info="Optional per-row system message.")
    with gr.Row():
        form.field("data", "max_length", label="Max length (tokens)")
        form.field("data", "too_long", label="Too-long rows")
        form.field("data", "train_on", label="Train on")
        form.field("data", "eval_fraction", label="Held-out share")
    with gr.Row():
        form.field("data", "system_prompt", label="System prompt for every conversation", scale=2)
        # A model setting, shown here beside the system prompt it stands in for; Start puts it in the model section
        # (model_settings below), and chatting with the run uses the same choice.
        form.field("model", "template_system_prompt", label="The model's own system prompt")
    with gr.Row():
        placeholder_values = gr.Textbox(label="Placeholder values (only if your examples hold {{name}}-style ones)",
                                        lines=2, placeholder="name: Ada\nauthor: Acme", elem_id="data-placeholders")
        form.field("data", "keep_placeholders", label="Train placeholders literally")
        role_names = gr.Textbox(label="Other role names", lines=2, placeholder="bot: assistant\ncustomer: user",
                                info="Only if your file names its speakers otherwise.", elem_id="data-roles")
    with gr.Row():
        form.field("data", "dedup", label="Repeated rows")
        form.field("data", "replay_share", label="Self-replay share (against forgetting)")
        mix_files = gr.Textbox(label="Other data to mix in, with its share of the training rows", lines=2,
                               placeholder="general.jsonl: 0.2", elem_id="data-mix",
                               info="For example general instructions, so the model keeps what it knew.")
    with gr.Row():
        mix_choice = gr.Dropdown([], value=None, label="Mix in one of your uploads", allow_custom_value=False,
                                 info=f"Adds it above with a share of {MIX_SHARE:g}; change the share there.",
                                 elem_id="data-mix-pick")
        mix_file = gr.File(label="Or upload a file to mix in", file_count="single",
                           file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt", ".md"],
                           elem_id="data-mix-upload")
    inspect_btn = gr.Button("Check the data", variant="primary", elem_id="data-check")
    summary = gr.Markdown("", elem_id="data-summary")
    with gr.Row():
        with gr.Column():
            page = gr.Number(value=1, precision=0, minimum=1, label="Preview page", elem_id="data-page")
            preview = gr.Dataframe(label="Rows, as the studio understood them", wrap=True,
                                   interactive=False, elem_id="data-preview")
        with gr.Column():
            chart = gr.BarPlot(x="tokens", y="rows", label="Token lengths", elem_id="data-histogram",
                               x_title="tokens per row", y_title="rows", sort=None)
    # A pair's two replies side by side, each after the same prompt, as the model sees them.
    with gr.Row():
        sample = gr.HighlightedText(label="First row of the page, exactly as the model sees it "
                                          "(green: learned, grey: context only; for a pair, its chosen reply)",
                                    color_map={"trained": "green", "masked": "lightgray"}, combine_adjacent=True,
                                    show_legend=True, elem_id="data-sample")
        sample_rejected = gr.HighlightedText(label="Its rejected reply (the one to prefer less)",
                                             color_map={"trained": "red", "masked": "lightgray"},
                                             combine_adjacent=True, visible=False, elem_id="data-sample-rejected")
    tool_sample = gr.HighlightedText(label="A row that calls tools, as the model sees it (the calls are learned, "
                                           "the tool results are context)",
                                     color_map={"trained": "green", "masked": "lightgray"}, combine_adjacent=True,
                                     visible=False, elem_id="data-tool-sample")
    bad = gr.Dataframe(label="Rows that will not be trained, and why", interactive=False, elem_id="data-bad")

    def current(values: dict) -> dict:
        return data_settings(form.to_dict(values).get("data", {}), values[data_path], values[prompt_col],
                             values[reply_col], values[system_col], values.get(placeholder_values, ""),
                             values.get(role_names, ""), values.get(mix_files, ""))

    def model_settings(values: dict) -> dict:
        """The model-section settings this tab holds (the template's own system prompt)."""
        return form.to_dict(values).get("model", {})

    def on_check(values: dict, request: gr.Request):
        d = check(studio, current(values), values[model_picker], values[page], request, values[stage],
                  model_settings(values).get("template_system_prompt", "leave_out"))
        mapped = d["mapped"]  # columns mapped automatically show in the pickers, to change if they are wrong

        def picker(target: str, component) -> gr.Dropdown:
            value = mapped[target] if mapped[target] != NONE else values[component]
            return gr.Dropdown(choices=d["columns"], value=value if value in d["columns"] else NONE)
        rejected, tools = d["sample_rejected"], d["tool_sample"]
        return {summary: d["summary"], preview: d["preview"], sample: d["sample"], chart: d["histogram"],
                bad: d["bad"], prompt_col: picker("instruction", prompt_col), reply_col: picker("output", reply_col),
                system_col: picker("system", system_col),
                sample_rejected: gr.HighlightedText(value=rejected, visible=rejected is not None),
                tool_sample: gr.HighlightedText(value=tools, visible=tools is not None),
                placeholder_values: gr.Textbox(label=d["placeholders_label"])}

    inputs = {data_path, model_picker, stage, page, prompt_col, reply_col, system_col, placeholder_values, role_names,
              mix_files, *form.fields.values()}
    outputs = [summary, preview, sample, chart, bad, prompt_col, reply_col, system_col, sample_rejected, tool_sample,
               placeholder_values]
    # An upload changes the remembered name, and the check below runs on that change.
    upload.upload(bind(uploaded, studio), upload, [data_path, source, last_upload])
    # The demo set chosen: nothing to remember, so a reload opens on the demo set too.
    use_demo.click(lambda stage_name: (*demo_for(stage_name), None), stage, [data_path, source, last_upload]).then(
        on_check, inputs, outputs, concurrency_id="data")
    def on_remembered_check(values: dict, request: gr.Request):
        """Once the page is on the visitor's upload (just uploaded, or remembered across a reload): the checks and
        preview 'Check the data' gives. Nothing for the demo set, whose preview is a click away."""
        from studio.data import is_demo
        return {summary: gr.skip()} if is_demo(values[data_path]) else on_check(values, request)

    # When the page loads, and whenever the remembered name changes (an upload, or the browser's stored name
    # arriving): the visitor's upload, checked, and their uploads to mix in.
    # On a reload the name arrives twice (empty at load, then the stored one): "always_last" keeps the second check
    # from being dropped while the first is still pending.
    gr.on(None, bind(remembered, studio), last_upload, [data_path, source]).then(
        on_remembered_check, inputs, outputs, concurrency_id="data", trigger_mode="always_last").then(
        bind(your_uploads, studio), mix_choice, mix_choice, trigger_mode="always_last")
    mix_choice.input(bind(mix_pick, studio), [mix_choice, mix_files], mix_files)
    mix_file.upload(bind(mix_upload, studio), [mix_file, mix_files], [mix_files, mix_choice])
    inspect_btn.click(on_check, inputs, outputs, concurrency_id="data")
    page.submit(on_check, inputs, outputs, concurrency_id="data")
    return SimpleNamespace(form=form, data_path=data_path, prompt_col=prompt_col, reply_col=reply_col,
                           system_col=system_col, current=current, model_settings=model_settings, inputs=inputs,
                           outputs=outputs,
                           use_demo=use_demo, source=source, stage=stage, check=on_check, last_upload=last_upload,
                           mix_files=mix_files, mix_choice=mix_choice, mix_file=mix_file)


def histogram(lengths: list[int]) -> pd.DataFrame:
    if not lengths:
        return pd.DataFrame({"tokens": [], "rows": []})
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // 15))
    bins: dict[int, int] = {}
    for n in lengths:
        start = lo + (n - lo) // width * width
        bins[start] = bins.get(start, 0) + 1
    return pd.DataFrame({"tokens": [f"{s}-{s + width - 1}" for s in sorted(bins)], "rows": [bins[s] for s in sorted(bins)]})


if __name__ == "__main__":
    run_alone(build, "Data")
