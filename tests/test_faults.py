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

from studio import launcher
from studio.config import ModelConfig
from studio.errors import StudioError
from studio.records import ErrorKind, State
from studio.runs import checkpoint_step, list_runs, new_run, open_run
from tests.conftest import tiny_config, train_here, wait_until


def oom_at(step: int, only_batch: int):
    def hook(args, state, control, **kwargs):
        if state.global_step == step and args.per_device_train_batch_size == only_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return hook


def test_out_of_memory_retries_with_a_smaller_micro_batch(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "eval_steps": 100}))
    inject("on_step_end", oom_at(3, only_batch=8))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert [(a.batch_size, a.grad_accum, a.from_step) for a in status.attempts] == [(8, 1, 0), (4, 2, 2)]
    assert "retrying automatically with batch size 4 and gradient accumulation 2" in status.attempts[-1].note
    cfg = run.config()
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (8, 1)  # the config stays as written
    assert [r.step for r in run.metrics() if r.is_training] == [1, 2, 3, 4, 5, 6]
    assert gc.get_freeze_count() == 0  # nothing of the finished run is kept from the collector


def test_setup_objects_are_frozen_while_training_and_released_when_it_fails(tiny_model, inject):
    """FreezeSetupObjects keeps the collector off the model during training; a failed run must not leave
    the model frozen (it would never be collected, and the next run's memory would be short)."""
    frozen_during = []
    inject("on_step_end", lambda args, state, control, **kwargs: frozen_during.append(gc.get_freeze_count()))
    inject("on_step_end", oom_at(2, only_batch=8))
    run = new_run(tiny_config(tiny_model, training={"max_steps": 4, "oom_retry": False}))
    status = train_here(run)
    assert status.state is State.FAILED and frozen_during and frozen_during[0] > 1000
    assert gc.get_freeze_count() == 0


def test_out_of_memory_without_retry_fails_with_a_hint_and_keeps_checkpoints(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "oom_retry": False}))
    inject("on_step_end", oom_at(3, only_batch=8))
    status = train_here(run)
    assert status.state is State.FAILED and "Lower training.batch_size" in status.message
    assert status.error_kind is ErrorKind.OUT_OF_MEMORY
    assert run.last_checkpoint().name == "checkpoint-2"
    # The slot is free: the next run starts (a worker) and finishes.
    again = launcher.start(tiny_config(tiny_model, training={"max_steps": 2, "batch_size": 4}))
    assert launcher.wait(again, 300) and again.run.status().state is State.COMPLETED


def test_full_disk_while_saving_fails_clearly_and_keeps_earlier_checkpoints(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "eval_steps": 100}))

    def disk_full(args, state, control, **kwargs):
        if state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
    inject("on_save", disk_full)
    status = train_here(run)
    assert status.state is State.FAILED and "disk is full" in status.message
    assert status.error_kind is ErrorKind.DISK_FULL
    assert "checkpoint-2" in [c.name for c in run.complete_checkpoints()]
    assert not (run.checkpoints_dir / "checkpoint-4").exists()  # the torn one is removed to give space back


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
    run = open_run("killed")
    worker = run.stored_status().worker_pid
    assert worker and worker != proc.pid  # the CLI follows; a worker process of its own trains
    os.kill(worker, signal.SIGKILL)  # no clean-up of any kind, possibly mid-checkpoint
    proc.wait(60)
    assert "interrupted" in run.status().state.value  # the CLI noticed the worker's death and said so
    assert "SIGKILL" in run.status().message

    resume_from = checkpoint_step(run.last_checkpoint())
    resumed = launcher.resume("killed")
    wait_until(lambda: max([r.step for r in run.metrics() if r.is_training] or [0]) >= resume_from + 3
               or not resumed.alive())
    launcher.stop(run)
    assert launcher.wait(resumed, 300)
    steps = [r.step for r in run.metrics() if r.is_training]
    assert steps == list(range(1, len(steps) + 1))  # no gap, no repeat: the count continues
    assert steps[-1] > resume_from and run.status().state is State.COMPLETED


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
    status = train_here(new_run(tiny_config(folder, training={"max_steps": 2})))
    assert status.state is State.COMPLETED, status


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
    from studio.paths import uploads_dir
    name = studio.store_upload(str(small), "../../etc")  # a visitor's name never becomes a path
    stored = [p for p in uploads_dir().rglob(name)]
    assert len(stored) == 1 and stored[0].parent.parent == uploads_dir() and ".." not in stored[0].parent.name


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
    status = train_here(new_run(tiny_config(tiny_model, data={"path": str(data), "max_length": 32})))
    assert status.state is State.FAILED and "No training rows are left" in status.message
    assert "max_length" in status.message


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
