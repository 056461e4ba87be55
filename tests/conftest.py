import os

import studio  # noqa: F401 - first: it sets OMP_WAIT_POLICY before any test imports torch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One model cache for the whole suite (and across runs): the bundled model is converted only once.
os.environ.setdefault("STUDIO_MODEL_CACHE", str(ROOT / ".studio-test-cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers started by tests keep no spare worker (each would import the training libraries, ~10 s of CPU);
# tests/test_worker.py turns it on where the spare itself is tested.
os.environ.setdefault("STUDIO_SPARE_WORKER", "0")


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own empty studio folder."""
    home = tmp_path / "studio-home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.delenv("STUDIO_LIMITS", raising=False)  # a shared Studio made by a test sets it for the process
    yield home
    _end_workers_under(home)


def _end_workers_under(home: Path) -> None:
    """End training workers a test left running in its folder. Runs outlive the page by design, so a test that
    fails before pressing Stop would otherwise leave its run training for minutes, slowing every later test."""
    import signal
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"studio.training.worker" in cmdline and any(str(home).encode() in arg for arg in cmdline):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


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
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values  # top-level fields: name, stage
    return from_dict(data)


class Hook:
    """A trainer callback built from one method, for injecting faults at a chosen step."""

    def __init__(self, event: str, fn):
        setattr(self, event, fn)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture()
def inject(monkeypatch):
    """inject(event, fn): every SFT trainer built in this process during the test also gets this callback (a
    fault to survive). Runs trained in this process: `train_here`."""
    from studio.stages import sft
    original = sft.build
    hooks = []

    def build(prep, job, arguments, callbacks):
        return original(prep, job, arguments, [*hooks, *callbacks])

    monkeypatch.setattr(sft, "build", build)
    return lambda event, fn: hooks.append(Hook(event, fn))


def train_here(run, stop=None, resume=False):
    """Train a run in this process, through the worker's own code (its process boundary aside); the final
    status. `stop`: a threading.Event standing in for the Stop button."""
    from studio.training.worker import execute
    return execute(run, resume, (lambda: stop.is_set() or run.stop_requested()) if stop else None)


def sft_trainer(cfg, callbacks=()):
    """(the SFT stage's trainer for `cfg`, set up as the worker sets it up, and what it was built from)."""
    from studio.runs import new_run
    from studio.stages import Job, sft
    from studio.training import loop
    run = new_run(cfg)
    job = Job(run, cfg, False, lambda: False)
    prep = loop.prepare(job, loop.Recipe(sft.encode, sft.build))
    attempt = loop.Attempt(cfg.training.batch_size, cfg.training.grad_accum)
    return sft.build(prep, job, loop.arguments(prep, run, attempt), list(callbacks)), prep


def llama_8b_shape(tied_embeddings=False):
    """Llama-3.1-8B's sizes, as the planner's estimates read them (the bench's 8B shape)."""
    from studio.shapes import ModelShape
    return ModelShape(layers=32, hidden=4096, intermediate=14336, attention_width=4096, kv_width=1024, vocab=128256,
                      tied_embeddings=tied_embeddings)


def machine(device="cuda", model_type="llama", shape=None, free_gib=None, **facts):
    """The facts a speed plan is made from, as a test states them (no GPU needed)."""
    from studio.training.fast.plan import Machine
    return Machine(device=device, model_type=model_type, shape=shape, free_gib=free_gib, **facts)


def wait_until(predicate, timeout=300, every=0.2):
    """Poll until `predicate()` is truthy (and return it); generous limits for a slow, busy machine."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not reached in {timeout} s")
