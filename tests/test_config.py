import pytest

from studio.config import RunConfig, from_dict, to_dict
from studio.errors import StudioError
from studio.paths import PRESETS_DIR
from studio.presets import load_run_config, model_presets, read_yaml, run_presets


def test_every_preset_loads_and_round_trips():
    presets = run_presets()
    assert "demo" in presets
    for path in presets.values():
        cfg = load_run_config(path)
        assert from_dict(to_dict(cfg)) == cfg
    models = model_presets()
    assert "smollm2-135m" in models and len(models) >= 3
    for preset in models.values():
        assert preset["label"] and preset["model"]["name_or_path"]


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learnin_rate: 0.1\n")
    with pytest.raises(StudioError, match=r"training\.learnin_rate"):
        load_run_config(path)
    path.write_text("trainig:\n  epochs: 1\n")
    with pytest.raises(StudioError, match="trainig"):
        load_run_config(path)


def test_overrides_apply_with_types(tmp_path):
    cfg = load_run_config(PRESETS_DIR / "demo.yaml", ["training.epochs=1", "rank=4", "method.target_modules=[q_proj]"])
    assert cfg.training.epochs == 1.0 and cfg.method.rank == 4 and cfg.method.target_modules == ["q_proj"]
    with pytest.raises(StudioError, match="nonsense"):
        load_run_config(PRESETS_DIR / "demo.yaml", ["nonsense=1"])


@pytest.mark.parametrize("section,name,value,pattern", [
    ("training", "learning_rate", 1e9, "out of range"),
    ("training", "batch_size", 0, "out of range"),
    ("method", "rank", 0, "out of range"),
    ("method", "method", "magic", "not one of"),
    ("training", "epochs", float("nan"), "finite"),
    ("training", "batch_size", "eight", "expected a whole number"),
    ("training", "batch_size", 2.5, "expected a whole number"),
])
def test_bad_values_are_refused_by_name(section, name, value, pattern):
    with pytest.raises(StudioError, match=pattern) as err:
        from_dict({section: {name: value}})
    assert f"{section}.{name}" in str(err.value)


def test_run_names_with_path_tricks_are_refused():
    for name in ("../evil", "/abs", "a b", "x;rm -rf", ".hidden"):
        with pytest.raises(StudioError, match="not allowed"):
            from_dict({"name": name})


def test_every_field_has_help_text():
    from dataclasses import fields

    from studio import stages
    from studio.config import SECTIONS
    own = [s.settings for s in stages.registry().values() if s.settings is not None]
    for cls in [RunConfig, *SECTIONS.values(), *own]:
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            assert len(f.metadata.get("help", "")) > 15, f"{cls.__name__}.{f.name} has no help"


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(StudioError, match="top level"):
        read_yaml(path)


def test_bare_on_off_in_yaml_mean_the_choices(tmp_path):
    """YAML turns a bare `off` into false; in a preset (or a --set override) it means the choice "off"."""
    from studio.presets import load_run_config
    path = tmp_path / "p.yaml"
    path.write_text("training:\n  packing: off\n  fused_kernels: on\n")
    cfg = load_run_config(path, ["training.gradient_checkpointing=off"])
    assert (cfg.training.packing, cfg.training.fused_kernels, cfg.training.gradient_checkpointing) == ("off", "on", "off")
    path.write_text("training:\n  scheduler: off\n")  # a field without on/off choices still refuses a boolean
    with pytest.raises(StudioError, match="training.scheduler = False is not valid: expected a text"):
        load_run_config(path)
