"""Drive a launched app through gradio_client, as an automation script or a share-link visitor would."""

import json
import socket
import time
import zipfile

import pytest
from gradio_client import Client, handle_file

from tests.conftest import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def launched(studio_home):
    from studio.ui.launch import launch
    apps = []

    def start(**kwargs):
        port = free_port()
        apps.append(launch(host="127.0.0.1", port=port, block=False, **kwargs))
        return f"http://127.0.0.1:{port}/"

    yield start
    for app in apps:
        app.close()


def wait_for(predicate, timeout=300, every=0.3):
    return wait_until(predicate, timeout, every)


def test_whole_flow_upload_preview_train_stop_chat_export(launched, tiny_model, tmp_path):
    client = Client(launched(), verbose=False)
    model = client.predict(str(tiny_model), api_name="/describe_model")
    assert "q_proj" in model["layer_names"] and model["device"] == "cpu"

    data_file = tmp_path / "qa.jsonl"
    rows = [{"instruction": f"Say hello number {i}", "output": f"Ahoy {i}! Arr!"} for i in range(30)]
    rows.append({"instruction": "broken row", "output": ""})
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stored = client.predict(handle_file(str(data_file)), api_name="/upload_data")["data_path"]
    assert stored.startswith("qa-") and stored.endswith(".jsonl") and "/" not in stored  # a name, not a path

    report = client.predict({"path": stored, "max_length": 64}, str(tiny_model), 0, api_name="/inspect_data")
    assert report["format"] == "alpaca" and len(report["preview"]) == 10 and report["pages"] == 3
    assert report["bad_rows"] == [{"row": 31, "reason": "'output' is empty"}]
    assert len(report["lengths"]) == 30 and any(label == "trained" for _, label in report["sample"])
    kept = client.predict({"path": stored, "max_length": 64}, str(tiny_model), 0, "sft", "keep",
                          api_name="/inspect_data")
    assert kept["sample"] and kept["format"] == "alpaca"
    with pytest.raises(Exception, match="template_system_prompt"):  # the choice is checked, not passed on as is
        client.predict({"path": stored}, str(tiny_model), 0, "sft", "bogus", api_name="/inspect_data")

    config = {"name": "ui-flow", "model": {"name_or_path": str(tiny_model)}, "data": {"path": stored, "max_length": 64},
              "method": {"rank": 4}, "training": {"max_steps": 100000, "batch_size": 4, "save_steps": 100000,
                                                 "learning_rate": 1e-3}}
    started = client.predict(config, api_name="/start_training")
    assert started["run_id"] == "ui-flow"
    with pytest.raises(Exception, match="busy: ui-flow is training"):
        client.predict(config, api_name="/start_training")

    def losses():
        return [m for m in client.predict("ui-flow", api_name="/run_status")["metrics"] if "loss" in m]
    first = wait_for(lambda: len(losses()) >= 2 and losses())
    wait_for(lambda: len(losses()) > len(first) + 2)  # the plot's data keeps growing while it trains
    assert "Stopping" in client.predict(api_name="/stop_training")
    final = wait_for(lambda: (s := client.predict("ui-flow", api_name="/run_status"))["status"]["state"]
                     in ("completed", "failed") and s)
    assert final["status"]["state"] == "completed" and final["status"]["stopped_early"], final["status"]
    assert client.predict(api_name="/list_runs")[0]["id"] == "ui-flow"

    reply = client.predict("ui-flow", "Say hello number 3", "merged", 8, 0.0, api_name="/chat")
    assert isinstance(reply, str) and reply
    exported = client.predict("ui-flow", "adapter", api_name="/export_run")
    with zipfile.ZipFile(exported) as zf:
        assert "ui-flow-adapter/adapter_config.json" in zf.namelist()


def test_settings_sent_straight_to_the_api_are_checked_on_the_server(launched, tiny_model):
    client = Client(launched(), verbose=False)
    base = {"model": {"name_or_path": str(tiny_model)}}
    for section, values, pattern in (("training", {"learning_rate": 1e9}, "training.learning_rate"),
                                     ("training", {"batch_size": 0}, "training.batch_size"),
                                     ("method", {"rank": 0}, "method.rank"),
                                     ("method", {"method": "magic"}, "method.method")):
        with pytest.raises(Exception, match=pattern):
            client.predict({**base, section: values}, api_name="/start_training")
    assert client.predict(api_name="/list_runs") == []
    # Page events (dozens of unnamed inputs) are not part of the API.
    assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == {
        "/describe_model", "/upload_data", "/inspect_data", "/start_training", "/stop_training", "/resume_training",
        "/delete_run", "/run_status", "/list_runs", "/chat", "/export_run", "/start_evaluation", "/evaluation_report"}


def test_share_mode_requires_login_and_refuses_local_paths(launched, tiny_model, capsys):
    url = launched(share_local=True)
    password = capsys.readouterr().out.split("password: ")[1].split()[0]
    with pytest.raises(Exception):
        Client(url, verbose=False)
    with pytest.raises(Exception):
        Client(url, auth=("studio", "wrong"), verbose=False)
    client = Client(url, auth=("studio", password), verbose=False)
    with pytest.raises(Exception, match="local paths are not allowed"):
        client.predict(str(tiny_model), api_name="/describe_model")
    with pytest.raises(Exception, match="demo set or a file you uploaded"):
        client.predict({"path": "/etc/passwd"}, "bundled", 0, api_name="/inspect_data")
    import httpx
    with httpx.Client(base_url=url) as raw:
        assert raw.get("gradio_api/file=/etc/passwd").status_code in (401, 403)
        assert raw.get("monitoring/summary").status_code in (401, 403, 404)


def test_the_ui_layer_imports_no_torch(studio_home):
    """The UI only lays out components and calls the engine; building the whole app must not load torch."""
    import subprocess
    import sys
    code = ("import sys; from studio.ui.launch import build; build(); "
            "heavy = [m for m in ('torch', 'trl', 'peft') if m in sys.modules]; print(heavy); assert not heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_sessions_pressing_start_at_once_get_one_run(launched, tiny_model):
    import threading
    url = launched()
    config = {"model": {"name_or_path": str(tiny_model)}, "training": {"max_steps": 100000, "batch_size": 2}}
    outcomes = []

    def press(name):
        try:
            outcomes.append(Client(url, verbose=False).predict({**config, "name": name}, api_name="/start_training"))
        except Exception as err:  # noqa: BLE001
            outcomes.append(err)
    threads = [threading.Thread(target=press, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    started = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(started) == 1 and len(refused) == 1 and "is training" in str(refused[0])
    client = Client(url, verbose=False)
    assert [r["id"] for r in client.predict(api_name="/list_runs")] == [started[0]["run_id"]]
    client.predict(api_name="/stop_training")
    wait_for(lambda: client.predict(api_name="/run_status")["status"]["state"] == "idle")


@pytest.mark.slow
def test_share_visitors_cannot_stop_each_other_or_read_uploads(launched, tmp_path):
    url = launched(share_local=True, auth=["alice:alices-password", "bob:bobs-password"])
    alice = Client(url, auth=("alice", "alices-password"), verbose=False)
    bob = Client(url, auth=("bob", "bobs-password"), verbose=False)
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"instruction": "secret question", "output": "secret answer"}) + "\n")
    stored = alice.predict(handle_file(str(data)), api_name="/upload_data")["data_path"]
    with pytest.raises(Exception, match="demo set or a file you uploaded"):
        bob.predict({"path": stored}, "bundled", 0, api_name="/inspect_data")
    import httpx
    with httpx.Client(base_url=url) as raw:
        assert raw.get(f"gradio_api/file={stored}").status_code in (401, 403, 404)
    alice.predict({"name": "alices", "training": {"max_steps": 100000}}, api_name="/start_training")
    with pytest.raises(Exception, match="started by someone else"):
        bob.predict(api_name="/stop_training")
    assert "Stopping" in alice.predict(api_name="/stop_training")
    wait_for(lambda: alice.predict("alices", api_name="/run_status")["status"]["state"] == "completed", timeout=300)


def test_progress_says_how_the_run_trains_and_what_memory_it_may_use():
    """The Train tab's progress line shows the plan's own summary as the run's status records it: checkpointing
    of only some layers, and the memory estimate against the budget (a 12 GiB limit here)."""
    from studio.records import Progress, RunStatus, State
    from studio.shapes import ModelShape
    from studio.training.fast.plan import plan_speed
    from studio.ui.train_tab import progress_html
    from tests.conftest import machine, tiny_config
    shape = ModelShape(hidden=4096, layers=32, intermediate=14336, attention_width=4096, kv_width=1024, vocab=128256)
    cfg = tiny_config("unused", method={"method": "qlora", "rank": 16}, data={"max_length": 4096},
                      training={"batch_size": 1, "memory_limit_gib": 12})

    def shown(plan) -> str:
        status = RunStatus(state=State.RUNNING, step=2, total_steps=10, plan_summary=plan.summary())
        from studio.records import MetricRecord
        progress = Progress.of("r", status, [MetricRecord(step=2, loss=1.0, elapsed_s=4.0, tokens_per_s=8000.0)])
        return progress_html({**progress.__dict__, "state": progress.state.value})
    plan = plan_speed(cfg, machine(shape=shape, free_gib=79))
    text = shown(plan)
    checkpointed = 32 - plan.uncheckpointed_layers
    assert f"gradient checkpointing on {checkpointed} of 32 layers" in text and "8,000 tokens/s" in text
    assert f"about {plan.memory_estimate_gib:.1f} GiB of the 12.0 GiB it may use" in text
    assert "about 16 s left" in text  # 4 s for 2 steps, 8 to go
    assert "checkpointing" not in shown(plan.changed(gradient_checkpointing=False)).replace("no checkpointing", "")
    assert "fused kernels (LoRA)" in text  # the fused LoRA path (and Liger's or PyTorch's fused norm where used)
    plain = plan.changed(liger=False, fused_lora=False, fused_norm=False)
    assert "fused kernels" not in shown(plain)
    assert "packed rows, flex attention" in text  # the plan's attention in words, not transformers' name
    varlen = plan_speed(cfg, machine(shape=shape, free_gib=79, varlen_ok=True))
    assert "packed rows, variable-length flash attention" in shown(varlen)
