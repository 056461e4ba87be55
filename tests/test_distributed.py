"""Several processes for one run (studio/distributed.py): DDP and FSDP2 as CPU processes over gloo, started by the
launcher under torchrun exactly as GPUs would be; Stop, resume, a process that dies, and two machines on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from studio import distributed, launcher
from studio.config import DevicesConfig, to_dict
from studio.errors import StudioError
from studio.records import State
from studio.shapes import ModelShape
from tests.conftest import ROOT, machine, tiny_config, wait_until

GPUS = [distributed.Gpu(0, "H200", 130.0, 139.8), distributed.Gpu(1, "H200", 131.0, 139.8)]
EIGHT_B = ModelShape(hidden=4096, layers=32, intermediate=14336, attention_width=4096, kv_width=1024, vocab=128256)


# --- where processes go, without starting any ---
def test_gpus_setting_resolves_against_the_machine_and_names_what_is_wrong():
    assert distributed.placement(DevicesConfig(gpus=""), GPUS).processes == 1
    assert distributed.placement(DevicesConfig(gpus="all"), GPUS).processes == 2
    chosen = distributed.placement(DevicesConfig(gpus="1"), GPUS)
    assert chosen.processes == 1 and not chosen.distributed
    picked = distributed.placement(DevicesConfig(gpus="0, 1"), GPUS)
    assert picked.gpu_indices == [0, 1] and picked.on_gpus
    with pytest.raises(StudioError, match="has 2 GPUs"):
        distributed.placement(DevicesConfig(gpus="4"), GPUS)
    with pytest.raises(StudioError, match="asks for GPU 5"):
        distributed.placement(DevicesConfig(gpus="0,5"), GPUS)
    with pytest.raises(StudioError, match="names GPUs"):
        distributed.placement(DevicesConfig(gpus="0,1"), [])
    assert distributed.placement(DevicesConfig(gpus="2"), []).processes == 2  # CPU processes
    for bad in ("two", "0,0", "-1"):
        with pytest.raises(StudioError, match="devices.gpus"):
            distributed.parse_gpus(bad)


def test_several_machines_need_a_master_and_a_rank_within_range(tiny_model):
    with pytest.raises(StudioError, match="devices.master"):
        tiny_config(tiny_model, devices={"nodes": 2})
    with pytest.raises(StudioError, match="numbered from 0 to 1"):
        tiny_config(tiny_model, devices={"nodes": 2, "node_rank": 2, "master": "10.0.0.1:29500"})
    cfg = tiny_config(tiny_model, devices={"nodes": 2, "node_rank": 1, "master": "10.0.0.1:29500"})
    where = distributed.placement(cfg.devices, GPUS)
    command, env = distributed.launch_command("python", Path("/runs/r"), True, cfg.devices, where)
    assert "--nnodes=2" in command and "--node-rank=1" in command and "--master-addr=10.0.0.1" in command
    assert "--master-port=29500" in command and command[-2:] == ["/runs/r", "--resume"]
    assert env["NCCL_NVLS_ENABLE"] == "0"
    one, env = distributed.launch_command("python", Path("/runs/r"), False, DevicesConfig(gpus="0,1"),
                                          distributed.placement(DevicesConfig(gpus="0,1"), GPUS))
    assert "--standalone" in one and "--nproc-per-node=2" in one and env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_auto_strategy_is_ddp_when_one_gpu_holds_the_run_and_fsdp_when_it_cannot(tiny_model):
    from studio.training.fast.plan import plan_speed
    lora = tiny_config(tiny_model, method={"method": "lora", "rank": 16}, data={"max_length": 4096},
                       training={"batch_size": 1})
    plan = plan_speed(lora, machine(shape=EIGHT_B, free_gib=80.0, processes=2))
    assert plan.strategy == "ddp" and "fit one GPU" in " ".join(plan.reasons)
    assert plan.summary().startswith("2 processes (DDP")
    full = tiny_config(tiny_model, method={"method": "full"}, data={"max_length": 4096}, training={"batch_size": 1})
    alone = plan_speed(full, machine(shape=EIGHT_B, free_gib=80.0))
    shared = plan_speed(full, machine(shape=EIGHT_B, free_gib=80.0, processes=4))
    assert alone.strategy == "" and shared.strategy == "fsdp"
    assert "split across the 4 GPUs" in " ".join(shared.reasons)
    # The estimate is per GPU: a quarter of the weights and optimizer state each.
    assert shared.memory_estimate_gib < alone.memory_estimate_gib / 2
    asked = tiny_config(tiny_model, devices={"strategy": "ddp"})
    assert plan_speed(asked, machine(device="cpu", processes=2)).strategy == "ddp"


def test_a_shared_link_never_trains_across_machines_or_starts_cpu_crowds(tiny_model):
    from studio.service import Policy, Studio
    studio = Studio(Policy(share=True))
    base = to_dict(tiny_config(tiny_model))
    base["model"]["name_or_path"] = "bundled"
    for devices, words in (({"nodes": 2, "master": "203.0.113.9:29500"}, "several machines"),
                           ({"master": "203.0.113.9:29500"}, "several machines"),
                           ({"gpus": "8"}, "without GPUs")):
        with pytest.raises(StudioError, match=words):
            studio.start({**base, "devices": devices}, "a")
    runs = Path(os.environ["STUDIO_HOME"]) / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # refused before any run folder was made


# --- real processes: torchrun, gloo, the tiny model ---
def _train(cfg, timeout=600):
    started = launcher.start(cfg)
    assert launcher.wait(started, timeout)
    return started.run


def _losses(run):
    return [m.loss for m in run.metrics() if m.is_training]


@pytest.mark.slow
def test_ddp_and_fsdp2_train_like_one_process_with_the_same_global_batch(tiny_model):
    from safetensors.torch import load_file
    steps = {"max_steps": 4, "eval_steps": 2, "save_steps": 2}
    from studio.runs import new_run
    from tests.conftest import train_here
    alone = new_run(tiny_config(tiny_model, training={**steps, "batch_size": 8}))
    train_here(alone)
    results = {}
    for strategy in ("ddp", "fsdp"):
        run = _train(tiny_config(tiny_model, training={**steps, "batch_size": 4},
                                 devices={"gpus": "2", "strategy": strategy}))
        status = run.stored_status()
        assert status.state is State.COMPLETED, status.message
        assert status.processes == 2 and status.plan["strategy"] == strategy
        assert status.plan_summary.startswith(f"2 processes ({'DDP' if strategy == 'ddp' else 'FSDP2'}")
        steps_logged = [m.step for m in run.metrics() if m.is_training]
        assert steps_logged == [1, 2, 3, 4]  # one process keeps the records: each step once
        # Every process's tokens are counted, as one process counts the whole batch.
        assert run.metrics()[-2].tokens_seen == [m for m in alone.metrics() if m.is_training][-1].tokens_seen
        results[strategy] = run
    expected = _losses(alone)
    for strategy, run in results.items():
        assert _losses(run) == pytest.approx(expected, rel=1e-5), strategy
        mine, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (run, alone))
        assert mine.keys() == theirs.keys()
        assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < 1e-4, strategy
    assert (results["fsdp"].checkpoints_dir / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()


def _first_checkpoint_then(run, action):
    wait_until(run.last_checkpoint, every=0.05)
    action()


def _gone(pids) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            return False
    return True


@pytest.mark.slow
def test_stop_reaches_every_process_and_fsdp2_resumes_at_the_same_size(tiny_model):
    cfg = tiny_config(tiny_model, training={"max_steps": 30, "batch_size": 4, "save_steps": 2, "eval_steps": 30},
                      devices={"gpus": "2", "strategy": "fsdp"})
    started = launcher.start(cfg)
    run = started.run
    _first_checkpoint_then(run, lambda: launcher.stop(run))
    assert launcher.wait(started, 600)
    status = run.stored_status()
    assert status.state is State.COMPLETED and status.stopped_early, status.message
    assert 1 <= status.step < 30 and run.has_adapter()
    assert started.process.returncode == 0  # every process ended well: torchrun reports any that did not
    assert _gone(distributed.rank_pids(run.path).values())
    stopped_at = status.step
    # FSDP2's checkpoints are split per process: another number of processes is refused, naming the right one.
    edited = to_dict(run.config())
    edited["devices"]["gpus"] = "3"
    (run.path / "config.yaml").write_text(yaml.safe_dump(edited), encoding="utf-8")
    with pytest.raises(StudioError, match="resume it on 2"):
        launcher.resume(run.id)
    edited["devices"]["gpus"] = "2"
    (run.path / "config.yaml").write_text(yaml.safe_dump(edited), encoding="utf-8")
    resumed = launcher.resume(run.id)
    assert launcher.wait(resumed, 600)
    status = run.stored_status()
    assert status.state is State.COMPLETED and not status.stopped_early, status.message
    steps = [m.step for m in run.metrics() if m.is_training]
    assert steps == list(range(1, 31)) and stopped_at < 30


@pytest.mark.slow
def test_a_process_that_dies_fails_the_run_and_takes_the_others_down(tiny_model):
    cfg = tiny_config(tiny_model, training={"max_steps": 60, "batch_size": 4, "save_steps": 2, "eval_steps": 30},
                      devices={"gpus": "2"})
    started = launcher.start(cfg)
    run = started.run

    def kill_second():
        os.kill(distributed.rank_pids(run.path)[1], signal.SIGKILL)
    _first_checkpoint_then(run, kill_second)
    assert launcher.wait(started, 600)
    status = run.stored_status()
    assert status.state is State.FAILED
    assert "process" in status.message.lower() and "resume from checkpoint-" in status.message, status.message
    assert _gone(distributed.rank_pids(run.path).values())
    from studio import slot
    assert slot.holder() is None  # the training slot is free again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_localhost_train_one_run(tiny_model, tmp_path):
    """`studio train --nodes 2 --node-rank R --master HOST:PORT` on each machine; here both are this one, each with
    its own studio folder (its own runs and training slot), as two machines would have."""
    preset = tmp_path / "two.yaml"
    preset.write_text(yaml.safe_dump(to_dict(tiny_config(
        tiny_model, training={"max_steps": 4, "batch_size": 4, "save_steps": 2, "eval_steps": 2}))), encoding="utf-8")
    master = f"127.0.0.1:{_free_port()}"
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "STUDIO_HOME": str(tmp_path / f"node{rank}"), "PYTHONPATH": str(ROOT)}
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "studio", "train", str(preset), "--quiet", "--nodes", "2", "--node-rank",
             str(rank), "--master", master], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-2000:]
    folders = [Path(out.strip().splitlines()[-1]) for out, _ in outputs]
    first, second = (json.loads((f / "status.json").read_text()) for f in folders)
    assert first["state"] == second["state"] == "completed" and first["processes"] == 2
    assert [m["step"] for m in map(json.loads, (folders[0] / "metrics.jsonl").read_text().splitlines())
            if "loss" in m] == [1, 2, 3, 4]
    assert (folders[0] / "adapter" / "adapter_config.json").is_file()
    # Each machine keeps its own checkpoints, to resume from without shared storage.
    for folder in folders:
        assert (folder / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()


def test_the_train_tab_says_how_the_ticked_gpus_would_share_the_run(tiny_model, monkeypatch):
    from studio.service import Studio
    from studio.ui import train_tab
    monkeypatch.setattr(distributed, "detect_gpus", lambda: GPUS)
    assert train_tab.gpus_setting([]) == train_tab.gpus_setting(["0"]) == ""
    assert train_tab.gpus_setting(["1"]) == "1," and train_tab.gpus_setting(["1", "0"]) == "0,1"
    assert distributed.placement(DevicesConfig(gpus="1,"), GPUS).gpu_indices == [1]  # GPU 1 alone, not a count
    studio = Studio()
    cfg = to_dict(tiny_config(tiny_model))
    assert train_tab.device_plan(studio, cfg) == ""  # one GPU: nothing to decide
    cfg["devices"]["gpus"] = "0,1"
    text = train_tab.device_plan(studio, cfg)
    assert text.startswith("2 GPUs, DDP:") and "GiB on each GPU" in text and "16 in all" in text
    cfg["devices"]["strategy"] = "fsdp"
    assert train_tab.device_plan(studio, cfg).startswith("2 GPUs, FSDP2")


def test_a_ddp_run_resumed_on_another_number_of_processes_says_what_changes(tiny_model):
    from studio.runs import new_run
    run = new_run(tiny_config(tiny_model))
    run.update_status(processes=2, plan={"strategy": "ddp"})
    launcher._check_world_size(run, distributed.Placement(4, None, 1, True), resume=True)
    status = run.stored_status()
    assert status.processes == 4 and "on 4 processes where it trained on 2" in status.message
    run.update_status(processes=2, plan={"strategy": "fsdp"})
    with pytest.raises(StudioError, match="resume it on 2"):
        launcher._check_world_size(run, distributed.Placement(4, None, 1, True), resume=True)
