"""model.template_system_prompt on the page: the Data tab shows it beside the system prompt, its rendered sample
follows it, Start puts it in the run's model section, and chatting with the run uses the same choice."""

import gradio as gr
import pytest

from studio.service import Studio
from tests.conftest import tiny_config, train_here
from tests.test_data_wild import DEFAULT_SYSTEM_TEMPLATE

pytestmark = pytest.mark.filterwarnings("ignore")
DEFAULT_SYSTEM = "You are SmolLM, trained by Hugging Face"


def _sample_text(shown: dict) -> str:
    return "".join(text for text, _ in shown["sample"])


def test_the_data_tab_sample_follows_the_choice():
    """The bundled model (SmolLM2) adds a system prompt of its own; the rendered sample shows it only with 'keep'."""
    from studio.ui import data_tab
    studio = Studio()
    left_out = data_tab.check(studio, {"path": "demo", "max_length": 64}, "bundled", 1)
    kept = data_tab.check(studio, {"path": "demo", "max_length": 64}, "bundled", 1, None, "sft", "keep")
    assert "named SmolLM" not in _sample_text(left_out) and "named SmolLM" in _sample_text(kept)
    # The first check is unchanged by the second: each choice renders through a tokenizer of its own.
    again = data_tab.check(studio, {"path": "demo", "max_length": 64}, "bundled", 1)
    assert _sample_text(again) == _sample_text(left_out)
    with pytest.raises(gr.Error, match="template_system_prompt"):
        data_tab.check(studio, {"path": "demo"}, "bundled", 1, None, "sft", "sometimes")


def test_the_field_is_on_the_data_tab_with_its_help_and_start_reads_it():
    from studio.config import field_info
    from studio.ui import app, common
    studio = Studio()
    try:
        with gr.Blocks():
            from studio.ui import data_tab, model_tab, train_tab
            model = model_tab.build(studio)
            data = data_tab.build(studio, model.picker)
            train = train_tab.build(studio)
        field = data.form.fields["model.template_system_prompt"]
        assert field in data.inputs and field.info == field_info("model", "template_system_prompt")["help"]
        assert list(c[0] for c in field.choices) == ["leave_out", "keep"] and field.value == "leave_out"
        values = {c: c.value for c in {model.picker, *data.inputs, *train.inputs}}
        values[field] = "keep"
        cfg = app.form_config(studio, values, model, data, train)
        assert cfg["model"]["template_system_prompt"] == "keep" and cfg["model"]["name_or_path"] == "bundled"
        values[field] = "leave_out"
        assert app.form_config(studio, values, model, data, train)["model"]["template_system_prompt"] == "leave_out"
    finally:
        common.FIELD_LABELS.clear()


@pytest.mark.parametrize("choice", ["leave_out", "keep"])
def test_chatting_with_the_run_uses_the_runs_choice(tiny_model, choice):
    """A run trained with a template that adds its own system prompt: the chat with the tuned model and with the
    model it started from render a question the way the run trained, with that prompt left out or kept."""
    from studio import inference
    from studio.rendering import render_text
    cfg = tiny_config(tiny_model, model={"chat_template": DEFAULT_SYSTEM_TEMPLATE, "template_system_prompt": choice},
                      training={"max_steps": 1, "eval_steps": 100, "save_steps": 100, "samples": 0,
                                "forgetting_check": "off"})
    from studio.runs import new_run
    run = new_run(cfg)
    train_here(run)
    question = [{"role": "user", "content": "Who are you?"}]
    for source in ("adapter", "base"):
        chat = inference.load_chat_model(source, run.id)
        prompt = render_text(chat.tokenizer, question, add_generation_prompt=True)
        assert (DEFAULT_SYSTEM in prompt) == (choice == "keep"), source
        assert prompt.endswith("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
