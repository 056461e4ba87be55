"""Train tab: method and settings (each with its help text), presets, Start/Stop, live loss plot with
progress and time left, and the list of past runs.

The handlers are module functions of (studio, ...); ``build`` lays the tab out and wires them. Run it alone
with ``python -m studio.ui.train_tab``.
"""

from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import yaml

from studio.config import LORA_FAMILY, to_dict
from studio.records import duration, format_loss
from studio.ui.common import Form, bind, friendly, run_alone, visitor

ALL_LINEAR, ATTENTION, CHOOSE = "All linear layers (best quality)", "Attention only (lighter)", "Choose layers"
NOTHING = ("Nothing: the model chosen on the Model tab", "")
# Plots start from None: an empty DataFrame makes Gradio fix the colour encoding wrongly for good.
PLOT_EMPTY = None
SERIES_COLOURS = {"training loss": "#4f46e5", "held-out loss": "#f59e0b"}
LOSS_SERIES = (("loss", "training loss", "loss"), ("eval_loss", "held-out loss", "loss"))
SAMPLES_BY_STEP = "Replies to the same prompts as training goes: the starting model's (base), then at each evaluation"
SAMPLES_WITH_REWARDS = "Replies written at the last evaluation, with their rewards"


def _hidden():
    return gr.update(value=None, visible=False)


IDLE = ("No run is training.", "", PLOT_EMPTY, "")
# Run states after which there is a saved adapter to chat with (Stop and early stopping end "completed" too).
CHATTABLE = ("completed",)


# --- what the page shows, from a snapshot (studio.snapshot) ---
def show(snap: dict) -> tuple:
    """(status line, progress bar and plan, loss plot, log text, the stage's plot, its sample replies, the live
    panel, the "Chat with it" button) for one snapshot. The stage's plot and samples are hidden for stages that
    have none; the live panel shows while a run is followed, and the button once it finished with replies to
    chat with."""
    if not snap["run_id"]:
        return (*IDLE, _hidden(), _hidden(), gr.update(visible=False), gr.update(visible=False))
    st = snap["status"]
    message = f"**{snap['run_id']}**: {st.get('state', 'idle')}. {html.escape(st.get('message', ''))}"
    series = snap.get("series") or LOSS_SERIES
    stage_plot = plot_frame(snap["metrics"], series, chart="stage")
    return (message, progress_html(snap.get("progress"), snap.get("warnings"), snap.get("data_summary")),
            plot_frame(snap["metrics"], series),
            log_text(snap["metrics"]),
            gr.update(value=stage_plot, visible=stage_plot is not None) if stage_plot is not None else _hidden(),
            samples_table(snap), gr.update(visible=True),
            gr.update(visible=st.get("state") in CHATTABLE and st.get("stage") != "reward"))


def samples_table(snap: dict):
    """The sample replies: for most stages one row per prompt with the starting model's reply and one column per
    evaluation, newest last; for GRPO the last evaluation's replies with their rewards, newest first."""
    samples = snap.get("samples") or []
    if not samples:
        return _hidden()
    if snap.get("samples_layout") == "by step":
        return gr.update(value=pd.DataFrame(samples), visible=True, label=SAMPLES_BY_STEP)
    return gr.update(value=pd.DataFrame(samples[::-1]), visible=True, label=SAMPLES_WITH_REWARDS)


def progress_html(progress: dict | None, warnings: list[str] | None = None, data_lines: list[str] | None = None) -> str:
    """The progress bar with its step, time left and speed; under it the run's notes (what a small training set
    will do...) and warnings (held-out loss rising...), each in plain words, and what the run read from its data
    (format, rows used and skipped with reasons), folded."""
    if not progress or not progress.get("total_steps"):
        return ""
    step, total = progress["step"], progress["total_steps"]
    left = f", about {duration(progress['seconds_left'])} left" if progress.get("seconds_left") else ""
    speed = f", {progress['tokens_per_s']:,.0f} tokens/s" if progress.get("tokens_per_s") is not None else ""
    plan = (f"<div class='studio-plan'>Training with {html.escape(progress['plan_summary'])}.</div>"
            if progress.get("plan_summary") else "")
    notes = "".join(f"<div class='studio-advice'>{html.escape(text)}</div>" for text in progress.get("advice") or [])
    alarms = "".join(f"<div class='studio-warning' style='color:#b45309'><b>Warning:</b> {html.escape(text)}</div>"
                     for text in warnings or [])
    data = ""
    if data_lines:
        data = ("<details class='studio-data'><summary>" + html.escape(data_lines[0]) + "</summary>"
                + "".join(f"<div>{html.escape(line)}</div>" for line in data_lines[1:]) + "</details>")
    return (f"<div class='studio-progress'><progress value='{step}' max='{total}' style='width:100%'></progress>"
            f"<div>Step {step} of {total} ({100 * step / total:.0f}%){left}{speed}</div>{alarms}{notes}{data}{plan}"
            "</div>")


def plot_frame(metrics: list[dict], series=LOSS_SERIES, chart: str = "loss") -> pd.DataFrame | None:
    """A plot's data: one line per live metric of the run's stage drawn on `chart`, from (key, label, chart)
    triples. The value column is named 'loss' on either plot (the plots' y field)."""
    picked = [(key, name) for key, name, *where in series if (where[0] if where else "loss") == chart]
    rows = [{"step": m["step"], "loss": m[key], "series": name} for m in metrics for key, name in picked
            if isinstance(m.get(key), (int, float))]
    if not rows:
        return None
    # Gradio fixes the plot's series from the first data it gets; a blank point keeps a series (held-out
    # loss, say) in the legend until its first value arrives (a line skips points with no value).
    seen = {r["series"] for r in rows}
    for key, name in picked:
        if name not in seen and (chart == "loss" or any(key in m for m in metrics)):
            rows.append({"step": rows[0]["step"], "loss": float("nan"), "series": name})
    return pd.DataFrame(rows)


def log_text(metrics: list[dict]) -> str:
    lines = []
    for m in metrics[-50:]:
        if "loss" in m:
            lines.append(f"step {m['step']}: loss {format_loss(m['loss'])}, "
                         f"lr {m.get('learning_rate') or 0:.2e}, {m.get('tokens_per_s') or 0:.0f} tok/s")
        elif "eval_loss" in m:
            lines.append(f"step {m['step']}: held-out loss {format_loss(m['eval_loss'])}")
    return "\n".join(lines)


# --- handlers ---
@friendly
def start_run(studio, cfg_dict: dict, request: gr.Request = None) -> tuple:
    """Start a run from the form's config; the live view of it, the timer on, and the run id to follow."""
    result = studio.start(cfg_dict, visitor(request))
    return (*show(studio.snapshot(result["run_id"], visitor(request))), gr.Timer(active=True), result["run_id"])


@friendly
def stop_run(studio, request: gr.Request = None) -> None:
    gr.Info(studio.stop(visitor(request)))


@friendly
def tick(studio, run_id: str | None, request: gr.Request = None) -> tuple:
    """The timer's refresh: the followed run's view; the timer stays on while the run is live."""
    snap = studio.snapshot(run_id or None, visitor(request))
    return (*show(snap), gr.Timer(active=snap.get("active", False)))


@friendly
def reattach(studio, run_id: str | None, request: gr.Request = None) -> tuple:
    """On page load: follow the live run if there is one (closing the tab never stops training)."""
    run_id = studio.active_run_id(visitor(request)) or run_id
    if run_id is None:
        return (*IDLE, _hidden(), _hidden(), gr.update(visible=False), gr.update(visible=False),
                gr.Timer(active=False), None)
    return (*tick(studio, run_id, request), run_id)


@friendly
def resume_run(studio, run_id: str, request: gr.Request = None) -> tuple:
    if not run_id:
        raise gr.Error("Pick a run to resume in the list above.")
    gr.Info(studio.resume(run_id, visitor(request)))
    return (*show(studio.snapshot(run_id, visitor(request))), gr.Timer(active=True), run_id)


@friendly
def delete_run(studio, run_id: str, request: gr.Request = None) -> tuple:
    """Delete a run that is not training; the refreshed list of runs."""
    if not run_id:
        raise gr.Error("Pick a run to delete in the list above.")
    gr.Info(studio.delete(run_id, visitor(request)))
    return runs_table(studio, request)


def start_points(studio, request: gr.Request = None) -> gr.Dropdown:
    """The runs a new run may start from: this visitor's finished ones that write replies."""
    rows = [r for r in studio.runs_table(visitor(request)) if r["state"] == "completed" and r["has_adapter"]
            and r.get("stage") != "reward"]
    return gr.Dropdown(choices=[NOTHING, *[(f"{r['id']} ({r.get('stage') or 'sft'})", r["id"]) for r in rows]])


@friendly
def runs_table(studio, request: gr.Request = None) -> tuple:
    rows = studio.runs_table(visitor(request))
    frame = pd.DataFrame([{k: r[k] for k in ("id", "state", "step", "total_steps", "last_loss", "method", "model")}
                          for r in rows]) if rows else pd.DataFrame({"id": [], "state": []})
    return frame, gr.Dropdown(choices=[r["id"] for r in rows])


@friendly
def open_run(studio, run_id: str, request: gr.Request = None) -> tuple:
    """(status line, its settings as YAML, its loss plot) for a past run."""
    if not run_id:
        return "", "", PLOT_EMPTY
    d = studio.run_detail(run_id, visitor(request))
    st = d["status"]
    text = f"**{run_id}**: {st.get('state')}. {html.escape(st.get('message', ''))}"
    return text, yaml.safe_dump(d["config"], sort_keys=False), plot_frame(d["metrics"], d.get("series") or LOSS_SERIES)


@friendly
def preset_settings(choice: str) -> dict:
    """A run preset's settings as a config dict, for filling the form."""
    from studio.presets import load_run_config, run_presets
    return to_dict(load_run_config(run_presets()[choice]))


@friendly
def save_settings(studio, cfg_dict: dict, preset_name: str) -> gr.Dropdown:
    from studio.config import from_dict
    from studio.paths import PRESETS_DIR
    from studio.presets import run_presets, save_run_preset
    if studio.policy.share:
        raise gr.Error("Saving presets is turned off on shared links.")
    path = save_run_preset(from_dict(cfg_dict), (preset_name or "").strip(), PRESETS_DIR)
    gr.Info(f"Saved {path.name}.")
    return gr.Dropdown(choices=list(run_presets()), value=path.stem)


def gpus_setting(picked: list[str] | None) -> str:
    """devices.gpus from the ticked GPUs: empty for none or the first alone, else their numbers ('2,' for GPU 2
    alone: a bare number would be a count)."""
    picked = sorted({int(p) for p in picked or []})
    if not picked or picked == [0]:
        return ""
    return ",".join(map(str, picked)) + ("," if len(picked) == 1 else "")


@friendly
def device_plan(studio, cfg_dict: dict) -> str:
    """How the ticked GPUs would share the run, why, and the memory on each (nothing to say for one GPU)."""
    if not cfg_dict.get("devices", {}).get("gpus"):
        return ""
    return studio.device_plan(cfg_dict)


# The settings that mean something only for some methods, in the order applies_to gives their visibility.
METHOD_DEPENDENT = ("method.rank", "method.alpha", "method.dropout", "method.last_layers", "method.num_virtual_tokens",
                    "targets")


def applies_to(method: str) -> dict[str, bool]:
    """Which method-dependent settings the chosen method uses (the others are hidden): rank, alpha and dropout for
    the LoRA family (and how many of the last layers get add-ons), the target layers for it and IA3, virtual tokens
    for prompt and prefix tuning."""
    lora = method in LORA_FAMILY
    return {"method.rank": lora, "method.alpha": lora, "method.dropout": lora, "method.last_layers": lora,
            "method.num_virtual_tokens": method in ("prompt_tuning", "prefix_tuning"),
            "targets": lora or method == "ia3"}


def target_pick_for(targets: list[str]) -> str:
    return ALL_LINEAR if targets == ["all-linear"] else ATTENTION if targets == ["attention"] else CHOOSE


def targets_from(pick: str, chosen: list[str]) -> list[str]:
    if pick == ATTENTION:
        return ["attention"]
    if pick == CHOOSE:
        if not chosen:
            raise gr.Error("Tick at least one layer, or pick 'All linear layers'.")
        return list(chosen)
    return ["all-linear"]


def on_target_pick(pick: str, names: list[str]) -> gr.CheckboxGroup:
    return gr.CheckboxGroup(choices=names, visible=pick == CHOOSE)


# --- layout ---
def build(studio) -> SimpleNamespace:
    from studio.presets import load_run_config, run_presets
    # The page opens on the bundled model and the demo data, so the form starts with the demo preset.
    form = Form(initial=to_dict(load_run_config(run_presets()["demo"])))
    gr.Markdown("### 3. Train\nThe defaults work. Each setting says what it does under its name.")
    live = _live_panel()
    status, progress, plot, stage_plot, samples, log = (live.status, live.progress, live.plot, live.stage_plot,
                                                        live.samples, live.log)
    with gr.Row():
        preset = gr.Dropdown(choices=list(run_presets()), value="demo", label="Preset", scale=2,
                             info="Load a saved set of settings (presets/*.yaml).", elem_id="train-preset")
        load_preset = gr.Button("Load preset", scale=1)
        name = gr.Textbox(form.initial.get("name", ""), label="Run name", scale=2, elem_id="train-name",
                          info="Optional; letters, digits, '.', '_', '-'. A number is added if the name is taken.")
    stage_pick, stage_boxes = _stage_fields(form)
    start_from = gr.Dropdown([NOTHING], value="", label="Start from", elem_id="train-start-from",
                             info="Build on a finished run of yours, e.g. DPO after supervised fine-tuning, or "
                                  "start from the model chosen on the Model tab.")
    method = form.initial.get("method", {}).get("method", "lora")
    shown = applies_to(method)
    on_gpu = bool(studio.gpus())
    with gr.Row():
        form.field("method", "method", label="Method")
        form.field("method", "rank", label="LoRA rank", visible=shown["method.rank"])
        form.field("method", "num_virtual_tokens", label="Virtual tokens (prompt/prefix tuning)",
                   visible=shown["method.num_virtual_tokens"])
    with gr.Row():
        form.field("training", "learning_rate", label="Learning rate")
        form.field("training", "epochs", label="Epochs")
        form.field("training", "max_steps", label="Max steps")
        form.field("training", "batch_size", label="Batch size")
    with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
        with gr.Row():
            form.field("method", "alpha", label="LoRA alpha", visible=shown["method.alpha"])
            form.field("method", "dropout", label="LoRA dropout", visible=shown["method.dropout"])
            form.field("training", "grad_accum", label="Gradient accumulation")
        with gr.Row():
            target_pick = gr.Radio([ALL_LINEAR, ATTENTION, CHOOSE], value=ALL_LINEAR, label="LoRA target layers",
                                   info="Which of the model's layers get LoRA add-ons.", elem_id="train-targets",
                                   scale=1, visible=shown["targets"])
            form.field("method", "last_layers", label="LoRA only in the last ... layers (0: every layer)", scale=1,
                       visible=shown["method.last_layers"])
            layers = gr.CheckboxGroup([], label="The model's own layers (load the model on the Model tab to list "
                                      "them)", visible=False, elem_id="train-layers", scale=2)
        with gr.Row():
            form.field("training", "warmup_ratio", label="Warm-up share")
            form.field("training", "weight_decay", label="Weight decay")
            form.field("training", "scheduler", label="Schedule")
            form.field("training", "packing", label="Packing")
            form.field("training", "seed", label="Seed")
        with gr.Row():
            # On a CPU the run trains in float32 without the GPU's fast path or a GPU memory budget: nothing to set.
            form.field("training", "precision", label="Precision", visible=on_gpu)
            form.field("training", "gradient_checkpointing", label="Gradient checkpointing")
            form.field("training", "memory_limit_gib", label="GPU memory limit (GiB)", visible=on_gpu)
            form.field("training", "speed", label="Speed plan", visible=on_gpu)
            form.field("training", "eval_steps", label="Evaluate every")
            form.field("training", "save_steps", label="Checkpoint every")
            form.field("training", "logging_steps", label="Log every")
            form.field("training", "oom_retry", label="Retry smaller if out of memory")
    with gr.Accordion("Sample replies and overfitting guards", open=False, elem_id="train-guards"):
        with gr.Row():
            form.field("training", "samples", label="Sample replies")
            _sample_prompts_field(form)
        with gr.Row():
            form.field("training", "early_stopping_patience", label="Early stopping (evaluations without improvement)")
            form.field("training", "keep_best", label="Keep the best adapter")
            form.field("training", "forgetting_check", label="Forgetting check at the end")
    gpus = studio.gpus()
    # Only a machine with several GPUs has a choice to make here; with one (or none) the run simply uses it.
    with gr.Accordion("GPUs", open=True, visible=len(gpus) > 1, elem_id="train-gpus-box"):
        with gr.Row():
            gpu_pick = gr.CheckboxGroup([(g.label(), str(g.index)) for g in gpus],
                                        value=[str(gpus[0].index)] if gpus else [], label="GPUs to train on",
                                        info="Tick several to train on them together; each takes its share of every "
                                             "step. Free memory as of when the page opened.",
                                        elem_id="train-gpus", scale=2)
            form.field("devices", "strategy", label="How they share the work")
        device_plan = gr.Markdown("", elem_id="train-device-plan")
    with gr.Row():
        save_name = gr.Textbox(label="Save these settings as a preset named", scale=3, elem_id="train-save-name")
        save_preset = gr.Button("Save preset", scale=1)
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
    stop = live.stop
    timer = gr.Timer(2.0, active=False)
    watched = gr.State(None)

    with gr.Accordion("Past runs", open=False, elem_id="train-history"):
        table = gr.Dataframe(interactive=False, label="Runs, newest first", elem_id="runs-table")
        with gr.Row():
            run_pick = gr.Dropdown([], label="Open a run", scale=3, elem_id="runs-pick")
            refresh = gr.Button("Refresh list", scale=1)
            resume = gr.Button("Resume from last checkpoint", scale=1, elem_id="runs-resume")
            delete = gr.Button("Delete this run", scale=1, variant="stop", elem_id="runs-delete")
        run_status = gr.Markdown("")
        with gr.Row():
            run_config = gr.Code(language="yaml", label="Its settings", interactive=False)
            run_plot = gr.LinePlot(PLOT_EMPTY, x="step", y="loss", color="series", label="Its loss", height=280,
                                   color_map=SERIES_COLOURS)

    def fill_from(cfg: dict) -> dict:
        """{component: value} filling the form (and the target layers) from a config dict."""
        updates = form.updates_from(cfg)
        targets = cfg.get("method", {}).get("target_modules")
        if targets:
            pick = target_pick_for(targets)
            updates[target_pick] = pick
            if pick == CHOOSE:
                updates[layers] = gr.CheckboxGroup(value=targets, visible=True)
        if "name" in cfg:
            updates[name] = cfg["name"]
        if "stage" in cfg:
            updates[stage_pick] = cfg["stage"]
        return updates

    live_outputs = [status, progress, plot, log, stage_plot, samples, live.box, live.chat_with]
    method_dependent = [form.fields[key] for key in METHOD_DEPENDENT if key != "targets"] + [target_pick]
    form.fields["method.method"].change(
        lambda picked: [gr.update(visible=v) for v in applies_to(picked).values()], form.fields["method.method"],
        method_dependent, show_progress="hidden")
    if stage_boxes:
        stage_pick.change(lambda picked: [gr.Accordion(visible=name == picked) for name in stage_boxes], stage_pick,
                          list(stage_boxes.values()))
    timer.tick(bind(tick, studio), watched, [*live_outputs, timer], show_progress="hidden")
    load_preset.click(lambda choice: fill_from(preset_settings(choice)), preset,
                      {*form.fields.values(), target_pick, layers, name, stage_pick})
    stop.click(bind(stop_run, studio), None, None)
    resume.click(bind(resume_run, studio), run_pick, [*live_outputs, timer, watched], show_progress="hidden")
    refresh.click(bind(runs_table, studio), None, [table, run_pick])
    # The list follows the runs by itself: the status line changes when a run starts, moves on or ends.
    status.change(bind(runs_table, studio), None, [table, run_pick], show_progress="hidden")
    delete.click(bind(delete_run, studio), run_pick, [table, run_pick])
    run_pick.change(bind(open_run, studio), run_pick, [run_status, run_config, run_plot])
    # What Start reads from this tab (the page adds the Model and Data tabs' inputs).
    inputs = {name, stage_pick, start_from, target_pick, layers, gpu_pick, *form.fields.values()}
    return SimpleNamespace(form=form, name=name, stage=stage_pick, start_from=start_from, target_pick=target_pick,
                           layers=layers, start=start, stop=stop, gpu_pick=gpu_pick, device_plan=device_plan,
                           inputs=inputs,
                           status=status, progress=progress, plot=plot, log=log, timer=timer, watched=watched,
                           live_outputs=live_outputs, chat_with=live.chat_with, save_preset=save_preset,
                           save_name=save_name, preset=preset,
                           runs_table=table, run_pick=run_pick, fill_from=fill_from)


def _live_panel() -> SimpleNamespace:
    """The followed run at the top of the tab: its status line, Stop, and (while a run is followed) progress, the
    plots, sample replies, log and, once it has finished, "Chat with it". Start and the quick demo bring the page
    here, so nobody scrolls past the form to see their run."""
    status = gr.Markdown(IDLE[0], elem_id="train-status")
    with gr.Column(visible=False, elem_id="train-live") as box:
        with gr.Row():
            stop = gr.Button("Stop (saves the adapter)", variant="stop", elem_id="train-stop", scale=1)
            chat_with = gr.Button("Chat with it", variant="primary", visible=False, elem_id="train-chat-with",
                                  scale=1)
        progress = gr.HTML("", elem_id="train-progress")
        # The legend can be cut off in a narrow window, so the label says which line is which as well.
        plot = gr.LinePlot(PLOT_EMPTY, x="step", y="loss", color="series",
                           label="Loss, lower is better: blue = training rows, orange = held-out rows",
                           color_map=SERIES_COLOURS, elem_id="train-plot", height=320, x_title="step",
                           y_title="loss", color_title="line", x_axis_format="d")
        stage_plot = gr.LinePlot(PLOT_EMPTY, x="step", y="loss", color="series", visible=False, height=280,
                                 label="What this stage learns (rewards, margins, accuracy)",
                                 elem_id="train-stage-plot", x_title="step", y_title="value", color_title="line",
                                 x_axis_format="d")
        samples = gr.Dataframe(label=SAMPLES_WITH_REWARDS, visible=False,
                               interactive=False, wrap=True, elem_id="train-samples")
        log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, autoscroll=True, elem_id="train-log")
    return SimpleNamespace(status=status, box=box, stop=stop, chat_with=chat_with, progress=progress, plot=plot,
                           stage_plot=stage_plot, samples=samples, log=log)


# Scrolls the page to the followed run's status (run in the browser when Start or the quick demo is pressed).
SHOW_LIVE_PANEL = ("() => { const top = document.getElementById('train-status'); "
                   "if (top) top.scrollIntoView({behavior: 'smooth', block: 'start'}); }")


def _sample_prompts_field(form: Form) -> gr.Dropdown:
    """training.sample_prompts as a list a person builds one prompt at a time (type, press Enter): a prompt may
    hold commas, which a text box read as a comma-separated list would split."""
    from studio.config import field_info
    info = field_info("training", "sample_prompts")
    value = list(form.initial.get("training", {}).get("sample_prompts") or [])
    return form.add("training.sample_prompts", gr.Dropdown(
        choices=value, value=value, multiselect=True, allow_custom_value=True, interactive=True, scale=3,
        label="Your own sample prompts (type one, press Enter)", info=info["help"],
        elem_id="training-sample-prompts"))


def _stage_fields(form: Form):
    """The stage picker (shown when there is more than one stage) and, for each stage with settings of its own,
    a section of fields made from its settings dataclass: a new stage needs nothing here."""
    from dataclasses import fields

    from studio import stages
    registry = {name: stage for name, stage in stages.registry().items() if stage.picker}
    pick = gr.Dropdown([(s.label, s.name) for s in registry.values()], value="sft", label="What to train",
                       info=" ".join(f"{s.label}: {s.help}" for s in registry.values()), elem_id="train-stage",
                       visible=len(registry) > 1)
    boxes = {}
    for stage in registry.values():
        if stage.settings is not None:
            with gr.Accordion(f"{stage.label} settings", open=True, visible=stage.name == "sft") as box:
                with gr.Row():
                    for f in fields(stage.settings):
                        form.field(stage.name, f.name)
            boxes[stage.name] = box
    return pick, boxes


def wire_start(studio, train: SimpleNamespace, inputs: set, form_config) -> None:
    """Start and Save preset read the whole page's form (`form_config(values)` builds the config dict)."""
    def on_start(values: dict, request: gr.Request):
        return start_run(studio, form_config(values), request)

    def on_save(values: dict):
        return save_settings(studio, form_config(values), values[train.save_name])
    # The run panel is the progress display; a refused Start says why in one message (Gradio's toast) instead of
    # a red "Error" badge over each of the panel's boxes.
    train.start.click(on_start, inputs, [*train.live_outputs, train.timer, train.watched], concurrency_limit=None,
                      show_progress="hidden")
    train.start.click(None, None, None, js=SHOW_LIVE_PANEL)
    train.save_preset.click(on_save, {*inputs, train.save_name}, train.preset)


if __name__ == "__main__":
    def _alone(studio):
        train = build(studio)
        wire_start(studio, train, train.inputs,
                   lambda values: {**train.form.to_dict(values), "name": values[train.name] or "",
                                   "method": {**train.form.to_dict(values)["method"],
                                              "target_modules": targets_from(values[train.target_pick],
                                                                             values[train.layers])},
                                   "devices": {**train.form.to_dict(values).get("devices", {}),
                                               "gpus": gpus_setting(values[train.gpu_pick])}})
    run_alone(_alone, "Train")
