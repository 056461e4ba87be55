"""Model tab: pick the base model and see what it is, and what each method would need, before training.

Run it alone with ``python -m studio.ui.model_tab``.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from studio.config import BUNDLED_MODEL
from studio.ui.common import bind, friendly, run_alone


@friendly
def describe(studio, name: str):
    """(info table, memory table, the model's layer names, status line) for a model."""
    d = studio.describe_model(name)
    return (pd.DataFrame(d["info"], columns=["", ""]), pd.DataFrame(d["memory"]), d["layer_names"],
            f"Loaded **{d['name']}** on **{d['device']}**. Next: the Data tab.")


def preset_note(studio, name: str) -> str:
    """What picking `name` changes on the Train tab (a model preset's method and training settings)."""
    settings = studio.model_preset_settings(name)
    changed = [f"{key} {value}" for section in ("method", "training") for key, value in settings.get(section, {}).items()
               if key != "target_modules"]
    return f"The preset's settings are filled in on the Train tab: {', '.join(changed)}." if changed else ""


def build(studio) -> SimpleNamespace:
    gr.Markdown("### 1. Choose the model to fine-tune\nThe bundled model works offline and trains on a laptop CPU. "
                "Presets are well-known instruct models with settings that suit them.")
    choices = studio.model_choices()
    with gr.Row():
        picker = gr.Dropdown(choices=choices, value=BUNDLED_MODEL, label="Model", scale=3, allow_custom_value=True,
                             info="Pick one, or type a Hugging Face id (owner/name)"
                                  + ("" if studio.policy.share else ", a local model folder or a .gguf file") + ".",
                             elem_id="model-picker")
        load = gr.Button("Load model", variant="primary", scale=1, elem_id="model-load")
    with gr.Row():
        info = gr.Dataframe(headers=["", ""], label="What was loaded", interactive=False, elem_id="model-info")
        memory = gr.Dataframe(label="Estimated memory to train (batch 8 x 256 tokens)", interactive=False,
                              elem_id="model-memory")
    status = gr.Markdown("", elem_id="model-status")
    preset = gr.Markdown("", elem_id="model-preset")
    layer_names = gr.State([])
    outputs = [info, memory, layer_names, status]
    load.click(bind(describe, studio), picker, outputs, concurrency_id="model")
    picker.change(bind(preset_note, studio), picker, preset)
    return SimpleNamespace(picker=picker, load=load, info=info, memory=memory, layer_names=layer_names,
                           status=status, outputs=outputs, describe=bind(describe, studio))


if __name__ == "__main__":
    run_alone(build, "Model")
