"""Faults a run must survive: out of memory, a full disk, a killed process, bad models."""

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from studio.config import ModelConfig
from studio.errors import StudioError
from studio.runs import checkpoint_step, list_runs, open_run
from studio.training.manager import RunManager
from studio.training.trainer import train_run
from tests.conftest import tiny_config
from studio.runs import new_run


def oom_at(step: int, only_batch: int):
    def hook(args, state, control, **kwargs):
        if state.global_step == step and args.per_device_train_batch_size == only_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return hook


def test_out_of_memory_retries_with_a_smaller_micro_batch(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "eval_steps": 100}))
    inject("on_step_end", oom_at(3, only_batch=8))
    status = train_run(run)
    assert status["state"] == "completed", status
    assert "retrying automatically with batch size 4 and gradient accumulation 2" in status["retried"]
    cfg = run.config()
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (4, 2)
    assert [r["step"] for r in run.metrics() if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert gc.get_freeze_count() == 0  # nothing of the finished run is kept from the collector


def test_setup_objects_are_frozen_while_training_and_released_when_it_fails(tiny_model, inject):
    """FreezeSetupObjects keeps the collector off the model during training; a failed run must not leave
    the model frozen (it would never be collected, and the next run's memory would be short)."""
    frozen_during = []
    inject("on_step_end", lambda args, state, control, **kwargs: frozen_during.append(gc.get_freeze_count()))
    inject("on_step_end", oom_at(2, only_batch=8))
    run = new_run(tiny_config(tiny_model, training={"max_steps": 4, "oom_retry": False}))
    status = train_run(run)
    assert status["state"] == "failed" and frozen_during and frozen_during[0] > 1000
    assert gc.get_freeze_count() == 0


def test_a_runs_memory_limit_is_lifted_when_it_ends(monkeypatch):
    """training.memory_limit_gib caps one run; the process (and the chat model loaded after the run) gets the
    whole GPU back. No GPU here: the CUDA calls are recorded instead."""
    from studio.training import trainer as trainer_module
    fractions = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, *a: fractions.append(fraction))
    trainer_module.release_memory()
    assert fractions == [1.0]


def test_out_of_memory_without_retry_fails_with_a_hint_and_keeps_checkpoints(tiny_model, inject):
    manager = RunManager()
    run = manager.start(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "oom_retry": False}))
    inject("on_step_end", oom_at(3, only_batch=8))
    assert manager.wait(120)
    status = run.status()
    assert status["state"] == "failed" and "Lower training.batch_size" in status["message"]
    assert run.last_checkpoint().name == "checkpoint-2"
    # Memory was released and the manager is free: the next run starts and finishes.
    again = manager.start(tiny_config(tiny_model, training={"max_steps": 2, "batch_size": 4}))
    assert manager.wait(120) and again.status()["state"] == "completed"


def test_full_disk_while_saving_fails_clearly_and_keeps_earlier_checkpoints(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "eval_steps": 100}))

    def disk_full(args, state, control, **kwargs):
        if state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
    inject("on_save", disk_full)
    status = train_run(run)
    assert status["state"] == "failed" and "disk is full" in status["message"]
    assert "checkpoint-2" in [c.name for c in run.complete_checkpoints()]


def test_process_killed_mid_run_resumes_from_last_complete_checkpoint(tiny_model, tmp_path):
    preset = tmp_path / "long.yaml"
    preset.write_text(f"name: killed\nmodel: {{name_or_path: {tiny_model}}}\n"
                      "training: {max_steps: 100000, save_steps: 5, eval_steps: 100000, batch_size: 2}\n")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", str(preset), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    run_dir = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = list_runs()
        if runs and len(runs[0].complete_checkpoints()) >= 2:
            run_dir = runs[0]
            break
        time.sleep(0.2)
    assert run_dir is not None, "training never wrote two checkpoints"
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind, possibly mid-checkpoint
    proc.wait(30)

    manager = RunManager()  # a restart: the dead process's run is marked interrupted
    run = open_run("killed")
    assert run.status()["state"] == "interrupted"
    resume_from = checkpoint_step(run.last_checkpoint())
    manager.resume("killed")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and max(
            [r["step"] for r in run.metrics() if "loss" in r] or [0]) < resume_from + 3:
        time.sleep(0.1)
    manager.stop()
    assert manager.wait(120)
    steps = [r["step"] for r in run.metrics() if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # no gap, no repeat: the count continues
    assert steps[-1] > resume_from and run.status()["state"] == "completed"


@pytest.mark.parametrize("make,pattern", [
    (lambda d: d / "nope", "does not exist"),
    (lambda d: _folder(d, {"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "x.safetensors"),
     "trust_remote_code"),
    (lambda d: _folder(d, {"model_type": "llama"}, "pytorch_model.bin"), "pickle"),
    (lambda d: _folder(d, {"model_type": "llama"}, None), "no .safetensors"),
])
def test_models_that_cannot_be_loaded_say_why(tmp_path, make, pattern):
    from studio.models import resolve
    with pytest.raises(StudioError, match=pattern):
        resolve(str(make(tmp_path)))


def test_uncached_hub_id_offline_names_the_model_and_the_fix(monkeypatch):
    from studio.models import resolve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError, match=r"'someone/not-downloaded'.*huggingface-cli download someone/not-downloaded"):
        resolve("someone/not-downloaded")


def test_model_without_chat_template_still_trains_with_chatml(tmp_path):
    from tests.tiny import build_tiny_model
    folder = build_tiny_model(tmp_path / "no-template", with_template=False)
    from studio.models import load_tokenizer
    assert "<|im_start|>" in load_tokenizer(ModelConfig(name_or_path=str(folder))).chat_template
    status = train_run(new_run(tiny_config(folder, training={"max_steps": 2})))
    assert status["state"] == "completed", status


def test_uploads_over_the_limit_or_of_the_wrong_type_are_refused(tmp_path):
    from studio.service import Policy, Studio
    studio = Studio(Policy(share=True, max_upload_mb=1))
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * (2 * 2**20))
    with pytest.raises(StudioError, match="limit here is 1 MB"):
        studio.store_upload(str(big), "a" * 32)
    with pytest.raises(StudioError, match="only .jsonl"):
        studio.store_upload(str(tmp_path / "evil.sh"), "a" * 32)
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "hi"}\n')
    with pytest.raises(StudioError, match="not allowed"):
        studio.store_upload(str(small), "../../etc")


def _folder(root, config, weights):
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / weights).write_bytes(b"\0")
    return folder


def test_max_length_that_leaves_nothing_to_learn_is_an_error_not_a_nan(tiny_model, tmp_path):
    data = tmp_path / "long-prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Tell me about the sea " * 40, "output": "Arr!"}) + "\n"
                            for _ in range(10)))
    status = train_run(new_run(tiny_config(tiny_model, data={"path": str(data), "max_length": 32})))
    assert status["state"] == "failed" and "No training rows are left" in status["message"]
    assert "max_length" in status["message"]


def test_old_uploads_are_cleaned_up(studio_home, tmp_path):
    from studio.paths import uploads_dir
    from studio.service import Studio
    old, new = uploads_dir() / "a", uploads_dir() / "b"
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "data.jsonl").write_text("{}")
    os.utime(old / "data.jsonl", (time.time() - 8 * 86400,) * 2)
    Studio()
    assert not (old / "data.jsonl").exists() and (new / "data.jsonl").exists()


def test_a_gguf_file_path_loads_like_the_bundled_model():
    from studio.models import bundled_gguf_path, resolve
    folder = resolve(str(bundled_gguf_path()))
    assert folder == resolve("bundled")
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()


def test_describing_a_model_never_puts_a_model_loading_meanwhile_on_meta(tiny_model, monkeypatch):
    """The UI describes models (on the meta device) while a run may be loading its own: they must not mix.
    Found in CI: a process-wide meta patch made a training run fail with 'Cannot copy out of meta tensor'."""
    import threading

    import transformers

    from studio import models
    inside, release = threading.Event(), threading.Event()
    original = transformers.AutoModelForCausalLM.from_config

    def paused_from_config(*args, **kwargs):
        model = original(*args, **kwargs)
        inside.set()
        release.wait(60)  # stay inside inspect_model's meta context while the other thread loads
        return model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", paused_from_config)
    describing = threading.Thread(target=models.inspect_model, args=(ModelConfig(name_or_path=str(tiny_model)),))
    describing.start()
    try:
        assert inside.wait(60)
        loaded = models.load_model(str(tiny_model))
        assert not any(p.is_meta for p in loaded.parameters())
    finally:
        release.set()
        describing.join(60)
