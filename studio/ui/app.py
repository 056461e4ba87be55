"""Assemble the tabs into one Gradio app and wire the events that cross tabs (Start reads the model, data and
train tabs; picking a model preset fills the Train tab; the quick demo fills all of them)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.config import BUNDLED_MODEL, DEMO_DATA
from studio.paths import ASSETS_DIR
from studio.ui import api, chat_tab, data_tab, evaluate_tab, export_tab, model_tab, train_tab
from studio.ui.common import bind

CSS_PATH = ASSETS_DIR / "studio.css"


def form_config(studio, values: dict, model, data, train) -> dict:
    """The one mapping from the whole page's form to a config dict (validated by the engine)."""
    cfg = train.form.to_dict(values)
    picker = values[model.picker] or BUNDLED_MODEL
    cfg["model"] = {"name_or_path": picker,
                    **{k: v for k, v in studio.model_preset_settings(picker).get("model", {}).items()
                       if k == "chat_template"}}
    cfg["data"] = data.current(values)
    cfg["model"].update(data.model_settings(values))  # the template's own system prompt, set on the Data tab
    cfg["method"]["target_modules"] = train_tab.targets_from(values[train.target_pick], values[train.layers])
    cfg["name"] = (values[train.name] or "").strip()
    cfg["stage"] = values[train.stage] or "sft"
    cfg["model"]["start_from"] = values[train.start_from] or ""
    cfg.setdefault("devices", {})["gpus"] = train_tab.gpus_setting(values[train.gpu_pick])
    return cfg


def build_app(studio) -> gr.Blocks:
    with gr.Blocks(title="Fine-tuning Studio") as app:
        with gr.Row(elem_id="studio-header"):
            gr.Markdown("# Fine-tuning Studio\nTeach a language model new habits from your own examples: pick a "
                        "model, give it examples, train, then chat with the result.")
            quick = gr.Button("Quick demo: teach the bundled model to talk like a pirate", variant="primary",
                              elem_id="quick-demo", scale=0, min_width=260)
        if studio.policy.share:
            gr.Markdown("This studio is shared: models come from presets or the hub, and uploads are limited to "
                        f"{studio.policy.max_upload_mb} MB.", elem_id="share-banner")
        with gr.Tabs(selected="model", elem_id="tabs") as tabs:
            with gr.Tab("1 · Model", id="model", elem_id="tab-model"):
                model = model_tab.build(studio)
            with gr.Tab("2 · Data", id="data", elem_id="tab-data"):
                data = data_tab.build(studio, model.picker, gr.State("sft"))
            with gr.Tab("3 · Train", id="train", elem_id="tab-train"):
                train = train_tab.build(studio)
            with gr.Tab("4 · Chat", id="chat", elem_id="tab-chat") as chat_item:
                chat = chat_tab.build(studio)
            with gr.Tab("5 · Export", id="export", elem_id="tab-export") as export_item:
                export = export_tab.build(studio)
            with gr.Tab("6 · Evaluate", id="evaluate", elem_id="tab-evaluate") as evaluate_item:
                evaluate = evaluate_tab.build(studio)

        start_inputs = {model.picker, *data.inputs, *train.inputs}
        live = [*train.live_outputs, train.timer, train.watched]
        train_tab.wire_start(studio, train, start_inputs, lambda values: form_config(studio, values, model, data, train))
        train.stage.change(lambda stage: stage, train.stage, data.stage).then(
            data_tab.follow_stage, [train.stage, data.data_path], [data.data_path, data.source])
        train.stage.change(bind(train_tab.start_points, studio), None, train.start_from)
        train.target_pick.change(train_tab.on_target_pick, [train.target_pick, model.layer_names], train.layers)
        for changed in (train.gpu_pick, train.form.fields["devices.strategy"], train.form.fields["method.method"]):
            changed.change(lambda values: train_tab.device_plan(studio, form_config(studio, values, model, data, train)),
                           start_inputs, train.device_plan, show_progress="hidden")
        model.layer_names.change(train_tab.on_target_pick, [train.target_pick, model.layer_names], train.layers)
        # A model preset's method and training settings go into the Train tab's form, where they can be seen
        # and changed before Start.
        form_targets = {*train.form.fields.values(), train.target_pick, train.layers, train.name, train.stage}
        model.picker.input(lambda name: train.fill_from({k: v for k, v in studio.model_preset_settings(name).items()
                                                          if k in ("method", "training")}),
                            model.picker, form_targets)

        def demo_fill():
            updates = train.fill_from(train_tab.preset_settings("demo"))
            # The demo set is now the data, so a reload must not bring back the last upload.
            updates.update({model.picker: BUNDLED_MODEL, data.data_path: DEMO_DATA,
                            data.source: data_tab.DEMO_SOURCE, data.last_upload: None, tabs: gr.Tabs(selected="train")})
            return updates

        def demo_start(values: dict, request: gr.Request):
            return train_tab.start_run(studio, form_config(studio, values, model, data, train), request)
        quick.click(demo_fill, None, {*form_targets, model.picker, data.data_path, data.source, data.last_upload,
                                      tabs}).then(
            demo_start, start_inputs, live, show_progress="hidden").then(None, None, None, js=train_tab.SHOW_LIVE_PANEL)
        # "Chat with it" on a finished run: the Chat tab, on that run.
        train.chat_with.click(bind(chat_tab.finished_runs, studio), train.watched, chat.run_pick).then(
            lambda: gr.Tabs(selected="chat"), None, tabs)
        chat_item.select(bind(chat_tab.finished_runs, studio), chat.run_pick, chat.run_pick)
        export_item.select(bind(export_tab.finished_runs, studio), export.run_pick, export.run_pick)
        evaluate_tab.wire_start(studio, evaluate, data.data_path)
        evaluate_item.select(bind(evaluate_tab.finished_runs, studio), evaluate.run_pick, evaluate.run_pick).then(
            bind(evaluate_tab.against_choices, studio), evaluate.against, evaluate.against).then(
            bind(evaluate_tab.evaluations, studio), evaluate.past, evaluate.past)
        app.load(bind(chat_tab.finished_runs, studio), chat.run_pick, chat.run_pick).then(
            bind(export_tab.finished_runs, studio), export.run_pick, export.run_pick).then(
            bind(train_tab.start_points, studio), None, train.start_from)
        endpoints = api.register(studio)
        # Hidden progress, as for Start: the run panel shows its own state, and should the reattach fail, Gradio says
        # so in one message rather than a red "Error" badge over the status line.
        app.load(bind(train_tab.reattach, studio), train.watched, live, show_progress="hidden").then(
            bind(train_tab.runs_table, studio), None, [train.runs_table, train.run_pick]).then(
            model.describe, model.picker, model.outputs, concurrency_id="model")
    api.hide_page_events(app, endpoints)
    return app


def css() -> str:
    return Path(CSS_PATH).read_text(encoding="utf-8") if Path(CSS_PATH).is_file() else ""
