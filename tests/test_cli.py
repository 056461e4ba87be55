import json
import os
import subprocess
import sys

import pytest

from studio.demo import answers_taught_way


def studio(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


@pytest.fixture()
def tiny_preset(tmp_path, tiny_model):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: cli-run\nmodel:\n  name_or_path: {tiny_model}\ntraining:\n  max_steps: 3\n"
                    "  batch_size: 8\nmethod:\n  rank: 4\n")
    return path


def test_train_prints_run_folder_last_then_runs_chat_merge(tiny_preset, studio_home):
    done = studio("train", str(tiny_preset), "--set", "training.learning_rate=1e-3")
    assert done.returncode == 0, done.stderr
    run_dir = done.stdout.strip().splitlines()[-1]
    assert run_dir == str(studio_home / "runs" / "cli-run")
    assert "step 3/3" in done.stderr

    listed = studio("runs", "--json")
    rows = json.loads(listed.stdout)
    assert rows[0]["id"] == "cli-run" and rows[0]["state"] == "completed" and rows[0]["step"] == 3

    chat = studio("chat", "cli-run", "--prompt", "Hello", "--max-new-tokens", "5")
    assert chat.returncode == 0, chat.stderr
    merged = studio("merge", run_dir)
    assert merged.returncode == 0 and merged.stdout.strip().endswith("merged")


def test_errors_are_one_paragraph_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batch_size: 0\n")
    for args in (("train", str(bad)), ("chat", "no-such-run", "--prompt", "hi"), ("train", "missing.yaml")):
        done = studio(*args)
        assert done.returncode == 1
        assert done.stderr.startswith("Error: ") and "Traceback" not in done.stderr
    assert "training.batch_size" in studio("train", str(bad)).stderr


@pytest.mark.slow
def test_demo_on_the_bundled_model_learns_the_taught_way(studio_home):
    """The issue's 'done' check on the real model: train the demo preset, then chat in the taught way."""
    base = studio("chat", "--help")
    assert base.returncode == 0
    done = studio("train", "presets/demo.yaml", "--quiet", timeout=900)
    assert done.returncode == 0, done.stderr
    run_dir = done.stdout.strip().splitlines()[-1]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 / 2
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    answer = studio("chat", run_dir, "--prompt", "What is the capital of Portugal?", "--max-new-tokens", "40")
    assert answer.returncode == 0, answer.stderr
    assert answers_taught_way(answer.stdout), answer.stdout
    base_answer = studio("chat", run_dir, "--source", "base", "--prompt", "What is the capital of Portugal?",
                         "--max-new-tokens", "40")
    assert not answers_taught_way(base_answer.stdout), base_answer.stdout


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"), reason="this machine has an NVIDIA driver")
def test_a_machine_without_cuda_never_loads_bitsandbytes():
    """peft and trl import bitsandbytes whenever it is installed, and on a machine without CUDA it prints warnings
    on every command; the studio's processes mark it absent there, and trl and peft still load."""
    from studio.quiet import nvidia_driver_present
    if nvidia_driver_present():
        pytest.skip("this machine has nvidia-smi")
    code = ("import sys; from studio.quiet import quiet_libraries; quiet_libraries(); import peft, trl; "
            "from peft import LoraConfig; print(sys.modules.get('bitsandbytes') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert "bitsandbytes" not in out.stderr.lower() and "gemm_4bit" not in out.stderr
