"""Train tab: method and settings (each with its help text), presets, Start/Stop, live loss plot with
progress and ETA, and the list of past runs."""

from __future__ import annotations

import html
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import yaml

from studio.config import to_dict
from studio.runs import format_loss
from studio.ui.common import Form, friendly

ALL_LINEAR, ATTENTION, CHOOSE = "All linear layers (best quality)", "Attention only (lighter)", "Choose layers"
# Plots start from None: an empty DataFrame makes Gradio fix the colour encoding wrongly for good.
PLOT_EMPTY = None


def build(studio) -> SimpleNamespace:
    from studio.presets import load_run_config, run_presets
    # The page opens on the bundled model and the demo data, so the form starts with the demo preset.
    form = Form(initial=to_dict(load_run_config(run_presets()["demo"])))
    gr.Markdown("### 3. Train\nThe defaults work. Hover over a setting's description for what it does.")
    with gr.Row():
        preset = gr.Dropdown(choices=list(run_presets()), value="demo", label="Preset", scale=2,
                             info="Load a saved set of settings (presets/*.yaml).", elem_id="train-preset")
        load_preset = gr.Button("Load preset", scale=1)
        name = gr.Textbox(form.initial.get("name", ""), label="Run name", scale=2, elem_id="train-name",
                          info="Optional; letters, digits, '.', '_', '-'. A number is added if the name is taken.")
    with gr.Row():
        form.field("method", "method", label="Method")
        form.field("method", "rank", label="LoRA rank")
        form.field("method", "alpha", label="LoRA alpha")
        form.field("method", "dropout", label="LoRA dropout")
        form.field("method", "num_virtual_tokens", label="Virtual tokens (prompt/prefix tuning)")
    with gr.Row():
        target_pick = gr.Radio([ALL_LINEAR, ATTENTION, CHOOSE], value=ALL_LINEAR, label="LoRA target layers",
                               info="Which of the model's layers get LoRA add-ons.", elem_id="train-targets", scale=1)
        layers = gr.CheckboxGroup([], label="The model's own layers (load the model on the Model tab to list them)",
                                  visible=False, elem_id="train-layers", scale=2)
    with gr.Accordion("Training settings", open=True):
        with gr.Row():
            form.field("training", "learning_rate", label="Learning rate")
            form.field("training", "epochs", label="Epochs")
            form.field("training", "max_steps", label="Max steps")
            form.field("training", "batch_size", label="Batch size")
            form.field("training", "grad_accum", label="Gradient accumulation")
        with gr.Row():
            form.field("training", "warmup_ratio", label="Warm-up share")
            form.field("training", "weight_decay", label="Weight decay")
            form.field("training", "scheduler", label="Schedule")
            form.field("training", "packing", label="Packing")
            form.field("training", "seed", label="Seed")
        with gr.Row():
            form.field("training", "precision", label="Precision")
            form.field("training", "gradient_checkpointing", label="Gradient checkpointing")
            form.field("training", "memory_limit_gib", label="GPU memory limit (GiB)")
            form.field("training", "eval_steps", label="Evaluate every")
            form.field("training", "save_steps", label="Checkpoint every")
            form.field("training", "logging_steps", label="Log every")
            form.field("training", "oom_retry", label="Retry smaller if out of memory")
    with gr.Row():
        save_name = gr.Textbox(label="Save these settings as a preset named", scale=3, elem_id="train-save-name")
        save_preset = gr.Button("Save preset", scale=1)
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves the adapter)", variant="stop", elem_id="train-stop")
    status = gr.Markdown("No run is training.", elem_id="train-status")
    progress = gr.HTML("", elem_id="train-progress")
    plot = gr.LinePlot(PLOT_EMPTY, x="step", y="loss", color="series", label="Loss (lower is better)",
                       color_map=SERIES_COLOURS,
                       elem_id="train-plot", height=320, x_title="step", y_title="loss")
    log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, autoscroll=True, elem_id="train-log")
    timer = gr.Timer(2.0, active=False)
    watched = gr.State(None)

    with gr.Accordion("Past runs", open=False, elem_id="train-history"):
        runs_table = gr.Dataframe(interactive=False, label="Runs, newest first", elem_id="runs-table")
        with gr.Row():
            run_pick = gr.Dropdown([], label="Open a run", scale=3, elem_id="runs-pick")
            refresh = gr.Button("Refresh list", scale=1)
            resume = gr.Button("Resume from last checkpoint", scale=1, elem_id="runs-resume")
        run_status = gr.Markdown("")
        with gr.Row():
            run_config = gr.Code(language="yaml", label="Its settings", interactive=False)
            run_plot = gr.LinePlot(PLOT_EMPTY, x="step", y="loss", color="series", label="Its loss", height=280,
                                   color_map=SERIES_COLOURS)

    # --- handlers ---
    def show(snap: dict):
        """Status line, progress bar, plot data and log text for one snapshot."""
        st = snap["status"]
        metrics = snap["metrics"]
        state = st.get("state", "idle")
        head = f"**{snap['run_id']}**: {state}" if snap["run_id"] else "No run is training."
        message = f"{head}. {html.escape(st.get('message', ''))}" if snap["run_id"] else head
        return message, _progress_html(st, metrics), plot_frame(metrics), _log_text(metrics)

    @friendly
    def start_run(cfg_dict: dict, who: str):
        result = studio.start(cfg_dict, who)
        snap = studio.snapshot(result["run_id"])
        return (*show(snap), gr.Timer(active=True), result["run_id"])

    @friendly
    def stop_run(who):
        gr.Info(studio.stop(who))

    def tick(run_id):
        snap = studio.snapshot(run_id)
        keep_going = snap.get("active", False)
        return (*show(snap), gr.Timer(active=keep_going))

    def reattach(run_id):
        """On page load: follow the live run if there is one (closing the tab never stops training)."""
        active = studio.manager.active_run
        run_id = active.id if active else run_id
        if run_id is None:
            return ("No run is training.", "", PLOT_EMPTY, "", gr.Timer(active=False), None)
        return (*tick(run_id), run_id)

    @friendly
    def apply_preset(choice):
        from studio.presets import load_run_config
        cfg = to_dict(load_run_config(run_presets()[choice]))
        targets = cfg["method"]["target_modules"]
        pick = ALL_LINEAR if targets == ["all-linear"] else ATTENTION if targets == ["attention"] else CHOOSE
        updates = form.updates_from(cfg)
        updates[target_pick] = pick
        updates[name] = cfg.get("name", "")
        if pick == CHOOSE:
            updates[layers] = gr.CheckboxGroup(value=targets, visible=True)
        return updates

    @friendly
    def save_settings(cfg_dict: dict, preset_name: str):
        from studio.config import from_dict
        from studio.paths import PRESETS_DIR
        from studio.presets import save_run_preset
        if studio.policy.share:
            raise gr.Error("Saving presets is turned off on shared links.")
        path = save_run_preset(from_dict(cfg_dict), preset_name.strip(), PRESETS_DIR)
        gr.Info(f"Saved {path.name}.")
        return gr.Dropdown(choices=list(run_presets()), value=path.stem)

    def list_runs_table():
        rows = studio.runs_table()
        frame = pd.DataFrame([{k: r[k] for k in ("id", "state", "step", "total_steps", "last_loss", "method", "model")}
                              for r in rows]) if rows else pd.DataFrame({"id": [], "state": []})
        return frame, gr.Dropdown(choices=[r["id"] for r in rows])

    @friendly
    def open_run(run_id):
        if not run_id:
            return "", "", PLOT_EMPTY
        d = studio.run_detail(run_id)
        st = d["status"]
        text = f"**{run_id}**: {st.get('state')}. {html.escape(st.get('message', ''))}"
        return text, yaml.safe_dump(d["config"], sort_keys=False), plot_frame(d["metrics"])

    @friendly
    def resume_run(run_id, who):
        if not run_id:
            raise gr.Error("Pick a run to resume in the list above.")
        gr.Info(studio.resume(run_id, who))
        return (*show(studio.snapshot(run_id)), gr.Timer(active=True), run_id)

    def on_target_pick(pick, names):
        return gr.CheckboxGroup(choices=names, visible=pick == CHOOSE)

    live_outputs = [status, progress, plot, log]
    timer.tick(tick, watched, [*live_outputs, timer], show_progress="hidden")
    load_preset.click(apply_preset, preset, {*form.fields.values(), target_pick, layers, name})
    refresh.click(list_runs_table, None, [runs_table, run_pick])
    run_pick.change(open_run, run_pick, [run_status, run_config, run_plot])
    return SimpleNamespace(form=form, name=name, target_pick=target_pick, layers=layers, start=start, stop=stop,
                           stop_run=stop_run, status=status, progress=progress, plot=plot, log=log, timer=timer,
                           watched=watched, start_run=start_run, reattach=reattach, live_outputs=live_outputs,
                           save_settings=save_settings, save_preset=save_preset, save_name=save_name, preset=preset,
                           list_runs_table=list_runs_table, runs_table=runs_table, run_pick=run_pick,
                           resume=resume, resume_run=resume_run, on_target_pick=on_target_pick,
                           apply_preset=apply_preset)


def targets_from(pick: str, chosen: list[str]) -> list[str]:
    if pick == ATTENTION:
        return ["attention"]
    if pick == CHOOSE:
        if not chosen:
            raise gr.Error("Tick at least one layer, or pick 'All linear layers'.")
        return list(chosen)
    return ["all-linear"]


# How the progress line names each attention kernel (the plan stores transformers' implementation names).
ATTENTION_NAMES = {"packed_varlen": "variable-length flash", "flex_attention": "flex", "sdpa": "SDPA", "eager": "eager"}
SERIES = (("loss", "training loss"), ("eval_loss", "held-out loss"))
SERIES_COLOURS = {"training loss": "#4f46e5", "held-out loss": "#f59e0b"}


def plot_frame(metrics: list[dict]) -> pd.DataFrame | None:
    rows = []
    for m in metrics:
        for key, series in SERIES:
            if isinstance(m.get(key), (int, float)):
                rows.append({"step": m["step"], "loss": m[key], "series": series})
    if not rows:
        return None
    # Gradio fixes the plot's series from the first data it gets; a blank point keeps 'held-out loss'
    # in the legend until the first evaluation arrives (a line skips points with no value).
    for _, series in SERIES:
        if not any(r["series"] == series for r in rows):
            rows.append({"step": rows[0]["step"], "loss": float("nan"), "series": series})
    return pd.DataFrame(rows)


def _progress_html(status: dict, metrics: list[dict]) -> str:
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    train = [m for m in metrics if "loss" in m]
    if train:
        step = train[-1]["step"]
    if not total:
        return ""
    elapsed = train[-1]["elapsed_s"] if train else 0
    eta = ""
    if step and step < total and status.get("state") in ("running", "stopping"):
        eta = f", about {_duration(elapsed / step * (total - step))} left"
    speed = f", {train[-1].get('tokens_per_s', 0):,.0f} tokens/s" if train else ""
    pct = 100 * step / total
    plan = status.get("speed") or {}
    how = (f"<div class='studio-plan'>Training with {'packed' if plan.get('packing') else 'padded'} rows, "
           f"{html.escape(ATTENTION_NAMES.get(plan.get('attention'), str(plan.get('attention'))))} attention"
           f"{', fused kernels' if plan.get('liger') or plan.get('fused_lora') or plan.get('fused_norm') else ''}"
           f"{_checkpointing_text(plan)}{_memory_text(plan)}.</div>") if plan else ""
    return (f"<div class='studio-progress'><progress value='{step}' max='{total}' style='width:100%'></progress>"
            f"<div>Step {step} of {total} ({pct:.0f}%){eta}{speed}</div>{how}</div>")


def _checkpointing_text(plan: dict) -> str:
    if not plan.get("gradient_checkpointing"):
        return ""
    layers, kept = plan.get("layers") or 0, plan.get("uncheckpointed_layers") or 0
    if layers and kept:
        return f", gradient checkpointing on {layers - kept} of {layers} layers (the rest fit without)"
    return ", gradient checkpointing"


def _memory_text(plan: dict) -> str:
    estimate, budget = plan.get("memory_estimate_gib"), plan.get("memory_budget_gib")
    return f"; about {estimate:.1f} GiB of the {budget:.1f} GiB it may use" if estimate and budget else ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _log_text(metrics: list[dict]) -> str:
    lines = []
    for m in metrics[-50:]:
        if "loss" in m:
            lines.append(f"step {m['step']}: loss {format_loss(m['loss'])}, "
                         f"lr {m['learning_rate']:.2e}, {m.get('tokens_per_s', 0):.0f} tok/s")
        elif "eval_loss" in m:
            lines.append(f"step {m['step']}: held-out loss {format_loss(m['eval_loss'])}")
    return "\n".join(lines)
