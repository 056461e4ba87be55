"""The tabs' handlers are module functions of (studio, ...): called here without building or serving a page,
and each tab file serves itself alone."""

import os
import subprocess
import sys

import pytest

from studio.service import Studio
from tests.conftest import wait_until
from tests.servers import free_port

pytestmark = pytest.mark.filterwarnings("ignore")


def test_model_and_data_handlers_without_a_page(tiny_model):
    from studio.ui import data_tab, model_tab
    studio = Studio()
    info, memory, layers, status = model_tab.describe(studio, str(tiny_model))
    assert "q_proj" in layers and "LlamaForCausalLM" in info.to_string() and "Loaded" in status
    shown = data_tab.check(studio, {"path": "demo", "max_length": 64}, str(tiny_model), 1)
    assert "95 usable of 95 rows" in shown["summary"] and len(shown["preview"]) == 10
    assert any(label == "trained" for _, label in shown["sample"])


def test_train_handlers_follow_a_run_without_a_page(tiny_model):
    from studio.ui import train_tab
    studio = Studio()
    assert train_tab.reattach(studio, None)[0] == "No run is training."
    cfg = {"name": "handled", "model": {"name_or_path": str(tiny_model)},
           "training": {"max_steps": 100000, "batch_size": 2, "save_steps": 100000}}
    started = train_tab.start_run(studio, cfg, None)
    assert started[-1] == "handled" and "handled" in started[0]
    assert train_tab.reattach(studio, None)[-1] == "handled"  # a page opened now follows the live run
    wait_until(lambda: "loss" in train_tab.tick(studio, "handled")[3])
    status, progress, plot, log, timer = train_tab.tick(studio, "handled")
    assert "running" in status and "Training with padded rows, SDPA attention" in progress
    assert set(plot["series"]) == {"training loss", "held-out loss"} and "loss" in log
    train_tab.stop_run(studio, None)
    wait_until(lambda: "completed" in train_tab.tick(studio, "handled")[0])
    table, picker = train_tab.runs_table(studio)
    assert list(table["id"]) == ["handled"] and list(table["state"]) == ["completed"]
    text, settings, _ = train_tab.open_run(studio, "handled")
    assert "Stopped by you" in text and "max_steps: 100000" in settings


def test_each_tab_serves_alone():
    """`python -m studio.ui.<tab>` serves that tab by itself."""
    import httpx
    tabs = ("model_tab", "data_tab", "train_tab", "chat_tab", "export_tab")
    servers = {}
    for tab in tabs:
        port = free_port()
        env = {**os.environ, "STUDIO_PORT": str(port)}
        servers[tab] = (port, subprocess.Popen([sys.executable, "-m", f"studio.ui.{tab}"], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for tab, (port, process) in servers.items():
            def serving():
                assert process.poll() is None, process.stderr.read()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_until(serving, timeout=300, every=0.5)
            assert httpx.get(f"http://127.0.0.1:{port}/config").json()["title"] == tab.split("_")[0].capitalize()
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(30)
