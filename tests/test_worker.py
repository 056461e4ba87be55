"""Runs as worker processes: one launcher, no silent deaths, one run at a time across processes, a server that
may die while its run goes on, and run folders that may be damaged."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from gradio_client import Client

from studio import launcher, slot
from studio.errors import BusyError, StudioError
from studio.records import ErrorKind, State
from studio.runs import list_runs, new_run, open_run
from tests.conftest import tiny_config, wait_until
from tests.servers import Server

LONG = {"max_steps": 100000, "save_steps": 100000, "eval_steps": 100000, "batch_size": 2}


def losses(run) -> list:
    return [m for m in run.metrics() if m.is_training]


def fake_package(root, name: str, body: str):
    """A package `name` on a PYTHONPATH of its own, shadowing the installed one in a worker."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(body)
    return root


def test_a_worker_that_cannot_import_its_libraries_fails_with_the_message(tiny_model, tmp_path, monkeypatch):
    """The first-seconds ImportError that once left a run 'queued' forever now ends it as failed, saying why."""
    shadow = fake_package(tmp_path / "shadow", "trl",
                          "raise ImportError(\"cannot import name 'TrainerCallback' from 'transformers'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    launched = launcher.start(tiny_config(tiny_model, name="no-trl"))
    assert launcher.wait(launched, 120)
    status = launched.run.status()
    assert status.state is State.FAILED and status.error_kind is ErrorKind.CRASH, status
    assert "ImportError" in status.message and "TrainerCallback" in status.message
    assert slot.holder() is None  # the slot is free again
    assert "TrainerCallback" in (launched.run.path / "error.log").read_text()


def test_a_worker_whose_studio_cannot_import_still_writes_its_failure(tiny_model, tmp_path, monkeypatch):
    """Not even the studio's own modules load (here: no yaml): the worker writes the failure with the
    standard library alone."""
    monkeypatch.setenv("PYTHONPATH", str(fake_package(tmp_path / "shadow", "yaml", "raise ImportError('no yaml')\n")))
    launched = launcher.start(tiny_config(tiny_model, name="no-yaml"))
    assert launcher.wait(launched, 120)
    status = launched.run.status()
    assert status.state is State.FAILED and "could not start" in status.message and "no yaml" in status.message


def test_a_worker_that_dies_without_a_word_is_reported_with_its_exit_code(tiny_model, tmp_path, monkeypatch):
    """A crash in native code (here: os._exit at import) leaves no message of the worker's own: the launcher
    says how it ended, with the end of its log."""
    monkeypatch.setenv("PYTHONPATH", str(fake_package(tmp_path / "shadow", "trl",
                                                      "import os, sys\nprint('segfault-ish')\nsys.stdout.flush()\n"
                                                      "os._exit(3)\n")))
    launched = launcher.start(tiny_config(tiny_model, name="dies"))
    assert launcher.wait(launched, 120)
    status = launched.run.status()
    assert status.state is State.FAILED and status.error_kind is ErrorKind.WORKER_DIED
    assert "exit code 3" in status.message and "segfault-ish" in status.message


def test_bad_data_fails_the_run_with_the_message_within_seconds(tiny_model):
    launched = launcher.start(tiny_config(tiny_model, name="bad-data", data={"path": "/nowhere/rows.jsonl"}))
    assert launcher.wait(launched, 120)
    status = launched.run.status()
    assert status.state is State.FAILED and status.error_kind is ErrorKind.USER
    assert "/nowhere/rows.jsonl" in status.message


def test_a_killed_worker_is_noticed_from_its_pid_and_a_stale_slot_is_cleared(tiny_model):
    launched = launcher.start(tiny_config(tiny_model, name="victim", training=LONG))
    run = launched.run
    wait_until(lambda: losses(run) or not launched.alive())
    os.kill(launched.process.pid, signal.SIGKILL)
    wait_until(lambda: run.status().state is State.INTERRUPTED, timeout=60)  # the watcher saw it die
    assert "SIGKILL" in run.status().message
    assert slot.holder() is None and launcher.active_run() is None
    # Nobody watching: a run left 'running' by a worker that is gone is interrupted on the next look.
    run.update_status(state=State.RUNNING, worker_pid=launched.process.pid)
    assert launcher.reconcile_all() == ["victim"] and run.status().state is State.INTERRUPTED
    # A lock file naming a dead process blocks nothing.
    slot.lock_path().write_text(json.dumps({"run_id": "ghost", "pid": launched.process.pid, "started": "1"}))
    assert slot.holder() is None
    again = launcher.start(tiny_config(tiny_model, name="after", training={"max_steps": 1}))
    assert launcher.wait(again, 300) and again.run.status().state is State.COMPLETED


def test_resume_refuses_a_run_whose_worker_is_alive(tiny_model):
    launched = launcher.start(tiny_config(tiny_model, name="alive", training={**LONG, "save_steps": 1}))
    run = launched.run
    try:
        wait_until(lambda: run.last_checkpoint() or not launched.alive())
        with pytest.raises(StudioError, match="still training"):
            launcher.resume("alive")
    finally:
        launcher.stop(run)
        assert launcher.wait(launched, 300)
    assert run.status().state is State.COMPLETED


def test_the_page_and_the_cli_starting_at_once_train_exactly_one_run(tiny_model, tmp_path):
    preset = tmp_path / "cli.yaml"
    preset.write_text(f"name: from-cli\nmodel: {{name_or_path: {tiny_model}}}\ntraining: {json.dumps(LONG)}\n")
    outcomes = {}

    def cli():
        outcomes["cli"] = subprocess.run([sys.executable, "-m", "studio", "train", str(preset), "--quiet"],
                                         capture_output=True, text=True, timeout=600, env=os.environ.copy())

    def page():
        try:
            outcomes["page"] = launcher.start(tiny_config(tiny_model, name="from-page", training=LONG))
        except BusyError as err:
            outcomes["page"] = err
    threads = [threading.Thread(target=cli), threading.Thread(target=page)]
    for t in threads:
        t.start()
    threads[1].join(120)
    training = wait_until(lambda: launcher.active_run(), timeout=300)
    if isinstance(outcomes["page"], BusyError):  # the CLI won: the page was told at once who trains
        assert "busy: " in str(outcomes["page"]) and "is training" in str(outcomes["page"])
        assert training.id == "from-cli"
    else:  # the page won: the CLI said so and exited
        threads[0].join(300)
        assert outcomes["cli"].returncode == 1 and "busy: from-page is training" in outcomes["cli"].stderr
        assert training.id == "from-page"
    wait_until(lambda: losses(training), timeout=300)
    assert [r.id for r in list_runs()] == [training.id]  # the refused start left no folder behind
    launcher.stop(training)
    threads[0].join(600)
    wait_until(lambda: not training.status().active and slot.holder() is None, timeout=300)
    assert training.status().state is State.COMPLETED


@pytest.mark.slow
def test_the_run_goes_on_when_the_page_server_is_killed(tiny_model, tmp_path):
    """kill -9 of the server: the worker keeps training; a restarted server shows the run, its plot and
    progress, and its Stop reaches the worker."""
    first = Server(tmp_path / "first.log").wait_ready()
    client = Client(first.url, verbose=False)
    client.predict({"name": "survivor", "model": {"name_or_path": str(tiny_model)}, "training": LONG},
                   api_name="/start_training")
    run = open_run("survivor")
    wait_until(lambda: len(losses(run)) >= 2)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    seen = len(losses(run))
    wait_until(lambda: len(losses(run)) > seen + 2)  # still training with no server at all

    second = Server(tmp_path / "second.log").wait_ready()
    try:
        client = Client(second.url, verbose=False)
        live = client.predict("", api_name="/run_status")  # "" = the run training now
        assert live["run_id"] == "survivor" and live["status"]["state"] == "running" and live["active"]
        assert len([m for m in live["metrics"] if "loss" in m]) > seen and live["progress"]["step"] > seen
        assert "Stopping run survivor" in client.predict(api_name="/stop_training")
        done = wait_until(lambda: (s := client.predict("survivor", api_name="/run_status"))["status"]["state"]
                          == "completed" and s)
        assert done["status"]["stopped_early"] and run.has_adapter()
        assert client.predict(api_name="/list_runs")[0]["state"] == "completed"
    finally:
        second.stop()


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_ctrl_c_of_the_server_stops_its_runs_unless_asked_to_keep_them(tiny_model, tmp_path, keep):
    # Started with Ctrl-C ignored, as a script's background job is: the studio must still take it.
    server = Server(tmp_path / "server.log", *(["--keep-training"] if keep else []), ctrl_c_ignored=True).wait_ready()
    client = Client(server.url, verbose=False)
    client.predict({"name": "mine", "model": {"name_or_path": str(tiny_model)}, "training": LONG},
                   api_name="/start_training")
    run = open_run("mine")
    wait_until(lambda: losses(run))
    server.process.send_signal(signal.SIGINT)
    server.process.wait(300)
    output = server.output()
    if keep:
        assert "Leaving mine training (--keep-training)" in output
        seen = len(losses(run))
        wait_until(lambda: len(losses(run)) > seen + 1)  # trains on without the server
        launcher.stop(run)
        wait_until(lambda: run.status().state is State.COMPLETED)
    else:
        assert "Stopping mine after the current step and saving the adapter" in output
        status = run.status()
        assert status.state is State.COMPLETED and status.stopped_early and run.has_adapter(), status
    server.stop()


def test_damaged_run_folders_never_stop_the_studio_from_listing_the_others(tiny_model, tmp_path):
    from studio.service import Studio
    good = new_run(tiny_config(tiny_model, name="good"))
    damaged = {}
    for name, status_text in (("a-list", "[1, 2]"), ("wrong-types", json.dumps({"state": "running", "step": "six"})),
                              ("not-json", "{\"state\": "), ("bad-state", json.dumps({"state": "exploded"}))):
        run = new_run(tiny_config(tiny_model, name=name))
        (run.path / "status.json").write_text(status_text)
        damaged[name] = run
    (good.path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\nnot json\n[1]\n{"step": "x"}\n'
                                              '{"step": 2, "eval_loss": 2.0}\n')
    broken_config = new_run(tiny_config(tiny_model, name="bad-config"))
    (broken_config.path / "config.yaml").write_text("model: [unclosed\n")

    studio = Studio()  # starts (and reconciles) with all of them present
    table = {row["id"]: row for row in studio.runs_table("local")}
    assert set(table) == {"good", "bad-config", *damaged}
    for name in damaged:
        assert table[name]["state"] == "unreadable" and table[name]["message"].startswith("unreadable: status.json")
    assert "'step'" in table["wrong-types"]["message"] and "exploded" in table["bad-state"]["message"]
    assert table["good"]["step"] == 2 and table["good"]["last_loss"] == 2.5
    assert "cannot be read" in json.dumps(studio.run_detail("bad-config", "local")["config"])
    listed = subprocess.run([sys.executable, "-m", "studio", "runs"], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=300)
    assert listed.returncode == 0 and "unreadable: status.json" in listed.stdout and "good" in listed.stdout


@pytest.mark.slow
def test_the_page_server_starts_runs_in_a_spare_worker_that_ends_with_it(tiny_model, tmp_path, monkeypatch,
                                                                         studio_home):
    """The server keeps one worker with the libraries imported; Start hands it the run (and the slot's lock),
    another spare is made once the run has ended, and an idle spare ends when its server dies."""
    import re
    monkeypatch.setenv("STUDIO_SPARE_WORKER", "1")
    spare_log = studio_home / "spare-worker.log"

    def ready_spares() -> list[int]:
        return [int(p) for p in re.findall(r"spare worker (\d+) ready", spare_log.read_text())] \
            if spare_log.is_file() else []
    server = Server(tmp_path / "server.log").wait_ready()
    try:
        first = wait_until(ready_spares)[0]
        client = Client(server.url, verbose=False)
        client.predict({"name": "warm", "model": {"name_or_path": str(tiny_model)}, "training": LONG},
                       api_name="/start_training")
        run = open_run("warm")
        wait_until(lambda: losses(run))
        assert run.status().worker_pid == first and slot.holder().pid == first
        client.predict(api_name="/stop_training")
        wait_until(lambda: run.status().state is State.COMPLETED)
        second = wait_until(lambda: [p for p in ready_spares() if p != first])[0]
        assert slot.is_running(second)
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        server.stop()
    wait_until(lambda: not slot.is_running(second), timeout=60)
