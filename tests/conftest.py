import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One model cache for the whole suite (and across runs): the bundled model is converted only once.
os.environ.setdefault("STUDIO_MODEL_CACHE", str(ROOT / ".studio-test-cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own empty studio folder."""
    home = tmp_path / "studio-home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def tiny_config(model_dir, **sections):
    """A RunConfig on the tiny model and demo data, fast on any CPU; sections override fields."""
    from studio.config import from_dict
    data = {"model": {"name_or_path": str(model_dir)},
            "data": {"path": "demo", "max_length": 128},
            "method": {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
            "training": {"learning_rate": 1e-2, "max_steps": 8, "batch_size": 8, "warmup_ratio": 0.0,
                         "scheduler": "constant", "save_steps": 4, "eval_steps": 4}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


class Hook:
    """A trainer callback built from one method, for injecting faults at a chosen step."""

    def __init__(self, event: str, fn):
        setattr(self, event, fn)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture()
def inject(monkeypatch):
    """inject(event, fn): every trainer built during the test also gets this callback (a fault to survive)."""
    from studio.training import trainer as trainer_module
    original = trainer_module.build_trainer
    hooks = []

    def build(prep, run, callbacks):
        return original(prep, run, [*hooks, *callbacks])

    monkeypatch.setattr(trainer_module, "build_trainer", build)
    return lambda event, fn: hooks.append(Hook(event, fn))
