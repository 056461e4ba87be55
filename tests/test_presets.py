"""Every preset in presets/ does what it says: each of its settings reaches the config a run is made from,
through the code that reads it (the CLI's loader for run presets; the page's form for model presets)."""

import gradio as gr
import pytest
import yaml

from studio.config import from_dict, to_dict
from studio.paths import PRESETS_DIR
from studio.presets import load_run_config


def _settings(data: dict):
    """(section, field, value) for every setting a preset file names."""
    for section, values in data.items():
        if isinstance(values, dict):
            for field, value in values.items():
                yield section, field, value


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_run_presets_reach_the_config(path):
    raw = yaml.safe_load(path.read_text())
    cfg = to_dict(load_run_config(path))
    assert cfg["name"] == raw.get("name", "")
    for section, field, value in _settings(raw):
        assert cfg[section][field] == value, f"{path.name}: {section}.{field}"


@pytest.fixture()
def page():
    """The Model, Data and Train tabs as the app builds them (not served)."""
    from studio.service import Studio
    from studio.ui import data_tab, model_tab, train_tab
    studio = Studio()
    with gr.Blocks():
        model = model_tab.build(studio)
        data = data_tab.build(studio, model.picker)
        train = train_tab.build(studio)
    return studio, model, data, train


@pytest.mark.parametrize("path", sorted((PRESETS_DIR / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_picking_a_model_preset_puts_every_setting_into_the_run(path, page):
    from studio.ui.app import form_config
    studio, model, data, train = page
    raw = yaml.safe_load(path.read_text())
    name = raw["model"]["name_or_path"]
    settings = studio.model_preset_settings(name)
    assert settings and "label" not in settings
    # What the page does when the preset is picked: fill the Train tab's form; then what Start reads.
    updates = train.fill_from({k: v for k, v in settings.items() if k in ("method", "training")})
    components = {model.picker, *data.inputs, *train.inputs}
    values = {c: updates.get(c, c.value) for c in components}
    values = {c: (v.value if isinstance(v, gr.components.Component) else v) for c, v in values.items()}
    values[model.picker] = name
    cfg = to_dict(from_dict(form_config(studio, values, model, data, train)))
    for section, field, value in _settings(raw):
        assert cfg[section][field] == value, f"{path.name}: {section}.{field} is not applied"


def test_a_model_preset_that_trains_qlora_starts_qlora(page):
    """The case that was broken: the QLoRA preset's method never reached the run."""
    studio, *_ = page
    assert studio.model_preset_settings("Qwen/Qwen2.5-1.5B-Instruct")["method"]["method"] == "qlora"
