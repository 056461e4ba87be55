"""A shared studio tried as an attacker would: raw clients that log in as one visitor and go after another's
runs and uploads by name, by path and through the page's hidden events; guess passwords; upload files made to
explode; hold the training slot. Each test checks the refusal and that nothing changed on disk.

One shared studio (--share-local, accounts alice, bob, carol and the admin root) serves the module, in its own
process with its own home; its "hub" holds the tiny test model as studio-tests/tiny (share mode refuses local
model folders).
"""

import json
import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file

from studio.errors import StudioError
from tests.conftest import wait_until
from tests.servers import Server

pytestmark = pytest.mark.slow
PASSWORDS = {"alice": "alice-pass-1", "bob": "bob-pass-22", "carol": "carol-pass-333", "root": "root-pass-4444"}
LIMITS = {"max_rows": 5000, "max_row_chars": 20000, "max_total_chars": 2_000_000, "upload_quota_mb": 3,
          "check_seconds": 60, "check_memory_mb": 1024, "chat_max_new_tokens": 24, "chat_seconds": 60,
          "template_seconds": 5.0, "run_minutes": 240.0, "stop_grace_s": 3}
LONG = {"max_steps": 100000, "save_steps": 5, "eval_steps": 100000, "batch_size": 2}


def hub_cache(root: Path, model: Path) -> Path:
    """A Hugging Face cache folder holding `model` as the hub id studio-tests/tiny (revision main)."""
    repo = root / "models--studio-tests--tiny"
    commit = "1" * 40
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    home, cwd = root / "home", root / "cwd"
    cwd.mkdir()
    env = {"STUDIO_HOME": str(home), "HF_HUB_CACHE": str(hub_cache(root / "hub", tiny_model)),
           "STUDIO_LIMITS": json.dumps(LIMITS), "STUDIO_MAX_UPLOAD_MB": "2"}
    accounts = [arg for user, password in PASSWORDS.items() for arg in ("--auth", f"{user}:{password}")]
    server = Server(root / "server.log", "--share-local", *accounts, "--admin", "root", env=env,
                    cwd=cwd).wait_ready()
    yield SimpleNamespace(url=server.url, home=home, cwd=cwd, server=server)
    server.process.send_signal(signal.SIGINT)  # its runs stop and save, as on a person's Ctrl-C
    try:
        server.process.wait(300)
    finally:
        server.stop()


def visitor(shared, user: str) -> Client:
    return Client(shared.url, auth=(user, PASSWORDS[user]), verbose=False)


@contextmanager
def raw(shared, user: str | None = None):
    """A plain HTTP client (logged in as `user`): what an attacker's script is."""
    with httpx.Client(base_url=shared.url, timeout=120) as client:
        if user:
            assert client.post("login", data={"username": user, "password": PASSWORDS[user]}).status_code == 200
        yield client


def page_event(client: httpx.Client, fn_index: int, data: list, session: str | None = None) -> dict:
    """Call one of the page's events by its index, as the browser would, with values of the caller's choosing
    (in a fresh page session, or in `session` to follow on from earlier events)."""
    session = session or uuid.uuid4().hex[:12]
    joined = client.post("gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                         "trigger_id": None, "session_hash": session})
    if joined.status_code != 200:
        return {"refused": joined.status_code}
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    return {}


def files_under(folder: Path) -> dict:
    """Every file below `folder` with its size: what 'nothing changed on disk' compares."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def alices_run(shared) -> tuple[Client, str, str]:
    """Alice's upload (its name) and a run of hers that keeps training; started once for the module."""
    if not hasattr(shared, "alice"):
        alice = visitor(shared, "alice")
        data = shared.home.parent / "alice-data.jsonl"
        data.write_text("".join(json.dumps({"instruction": f"secret question {i}", "output": "secret answer"}) + "\n"
                                for i in range(40)))
        upload = alice.predict(handle_file(str(data)), api_name="/upload_data")["data_path"]
        run_id = alice.predict({"name": "alices", "model": {"name_or_path": "studio-tests/tiny"},
                                "data": {"path": upload, "max_length": 64}, "training": LONG},
                               api_name="/start_training")["run_id"]
        wait_until(lambda: len(alice.predict(run_id, api_name="/run_status")["metrics"]) >= 3)
        shared.alice = (alice, upload, run_id)
    return shared.alice


def test_without_a_login_nothing_answers(shared):
    with raw(shared) as anonymous:
        for path in ("config", "gradio_api/info", "gradio_api/queue/data?session_hash=x",
                     f"gradio_api/file={shared.home}/secret"):
            assert anonymous.get(path).status_code in (401, 403, 404), path
        assert anonymous.post("gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                            "session_hash": "x"}).status_code in (401, 403)
        assert anonymous.get("monitoring/summary").status_code in (401, 403, 404)


def test_password_guessing_is_throttled_per_client_and_per_account(shared):
    guesser_address = {"X-Forwarded-For": "10.1.1.1"}  # as the share tunnel passes a visitor's address on
    with raw(shared) as guesser:
        answers = [guesser.post("login", data={"username": "bob", "password": f"guess-{i}"},
                                headers=guesser_address).status_code for i in range(7)]
        assert answers[:5] == [400] * 5 and answers[5:] == [429, 429]  # locked out after five
        # Locked out, even the right password is refused: guessing on is useless.
        right = guesser.post("login", data={"username": "bob", "password": PASSWORDS["bob"]},
                             headers=guesser_address)
        assert right.status_code == 429 and "Try again in" in right.json()["detail"]
    # Spread over many addresses (as behind the share tunnel), the account itself locks after twenty.
    answers = []
    for i in range(25):
        with raw(shared) as client:
            answers.append(client.post("login", data={"username": "carol", "password": f"guess-{i}"},
                                       headers={"X-Forwarded-For": f"10.0.{i}.1"}).status_code)
    assert 429 in answers and answers.index(429) <= 20
    with raw(shared) as fresh:
        assert fresh.post("login", data={"username": "carol", "password": PASSWORDS["carol"]},
                          headers={"X-Forwarded-For": "10.9.9.9"}).status_code == 429
        # Another account from a fresh address is not affected.
        assert fresh.post("login", data={"username": "bob", "password": PASSWORDS["bob"]},
                          headers={"X-Forwarded-For": "10.9.9.8"}).status_code == 200


def test_a_visitor_cannot_reach_another_visitors_run_or_upload_through_the_api(shared):
    alice, upload, run_id = alices_run(shared)
    bob = visitor(shared, "bob")
    before = files_under(shared.home / "uploads")
    assert bob.predict(api_name="/list_runs") == []
    idle = bob.predict("", api_name="/run_status")
    assert idle["run_id"] is None and "Another visitor's run is training" in idle["status"]["message"]
    for api_name, args in (("/run_status", (run_id,)), ("/resume_training", (run_id,)), ("/delete_run", (run_id,)),
                           ("/export_run", (run_id, "adapter")), ("/chat", (run_id, "hi", "adapter", 8, 0.0))):
        with pytest.raises(Exception, match="No run called 'alices' here"):
            bob.predict(*args, api_name=api_name)
    with pytest.raises(Exception, match="started by someone else"):
        bob.predict(api_name="/stop_training")
    with pytest.raises(Exception, match="demo set or a file you uploaded"):
        bob.predict({"path": upload}, "bundled", 0, api_name="/inspect_data")
    with pytest.raises(Exception, match="demo set or a file you uploaded"):
        bob.predict({"name": "theft", "data": {"path": upload}}, api_name="/start_training")
    run = shared.home / "runs" / run_id
    assert not (run / "stop-request").exists() and (run / "config.yaml").is_file()
    assert files_under(shared.home / "uploads") == before
    # Alice's own view of her run names no owner and no server path.
    detail = json.dumps(alice.predict(run_id, api_name="/run_status"))
    assert str(shared.home) not in detail and "worker_pid\": 0" in detail
    listed = json.dumps(alice.predict(api_name="/list_runs"))
    assert run_id in listed and str(shared.home) not in listed


def test_the_page_events_called_directly_with_forged_values_refuse_too(shared):
    _, upload, run_id = alices_run(shared)
    run = shared.home / "runs" / run_id
    forged = [run_id, upload, f"../runs/{run_id}", str(run / "config.yaml")]
    with raw(shared, "bob") as bob:
        events = bob.get("config").json()["dependencies"]
        assert len(events) > 30
        stop_before = (run / "stop-request").exists()
        leaked = []
        for event in events:
            for value in forged:
                answer = json.dumps(page_event(bob, event["id"], [value] * len(event["inputs"])))
                # A path the attacker sent may come back in an echo; any other server path is a leak.
                echoed = str(shared.home) in value
                if "secret answer" in answer or "secret question" in answer or \
                        (not echoed and str(shared.home) in answer):
                    leaked.append((event["id"], value, answer[:300]))
        assert leaked == []
        assert (run / "stop-request").exists() == stop_before and run.is_dir()
    # The admin sees and may stop every run.
    root = visitor(shared, "root")
    assert run_id in [r["id"] for r in root.predict(api_name="/list_runs")]


def test_reward_code_and_other_visitors_runs_are_refused_as_stage_inputs(shared):
    _, _, run_id = alices_run(shared)
    marker = shared.home.parent / "reward-code-ran"
    code = shared.home.parent / "reward.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                    "def reward(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    bob = visitor(shared, "bob")
    grpo = {"name": "mine", "stage": "grpo", "model": {"name_or_path": "studio-tests/tiny"},
            "data": {"path": "demo-grpo"}}
    with pytest.raises(Exception, match="not allowed on a shared link"):
        bob.predict({**grpo, "grpo": {"reward_code": str(code)}}, api_name="/start_training")
    with pytest.raises(Exception, match="No run called 'alices' here"):
        bob.predict({**grpo, "grpo": {"reward_run": run_id}}, api_name="/start_training")
    with pytest.raises(Exception, match="No run called 'alices' here"):
        bob.predict({**grpo, "model": {"name_or_path": "studio-tests/tiny", "start_from": run_id}},
                    api_name="/start_training")
    assert not marker.exists()
    assert not [p for p in (shared.home / "runs").iterdir() if p.name.startswith("mine")]


def test_paths_and_dotdot_in_every_name_field_are_refused(shared):
    bob = visitor(shared, "bob")
    before = files_under(shared.home)
    (shared.cwd / "studio-tests" / "folder").mkdir(parents=True)  # an 'owner/name' that exists on the server
    (shared.cwd / "studio-tests" / "folder" / "config.json").write_text("{}")
    for run_id in ("/etc", "../runs/alices", "alices/../alices", str(shared.home / "runs" / "alices"), "..", "."):
        for api_name in ("/run_status", "/resume_training", "/delete_run"):
            with pytest.raises(Exception, match="No run called"):
                bob.predict(run_id, api_name=api_name)
    for path in ("/etc/passwd", "../uploads/x.jsonl", str(shared.home / "secret"), "~/.ssh/id_rsa"):
        with pytest.raises(Exception, match="demo set or a file you uploaded"):
            bob.predict({"path": path}, "bundled", 0, api_name="/inspect_data")
    for model in ("/tmp", "./model", "~/model", "a/b/c", "model.gguf", "studio-tests/folder", "..\\x"):
        with pytest.raises(Exception, match="local paths are not allowed"):
            bob.predict(model, api_name="/describe_model")
    with pytest.raises(Exception, match="templates of your own are not run here"):
        bob.predict({"model": {"name_or_path": "studio-tests/tiny", "chat_template": "{% for x in range(99) %}"}},
                    api_name="/start_training")
    with raw(shared, "bob") as client:
        for path in (f"gradio_api/file={shared.home}/secret", f"gradio_api/file={shared.home}/runs/alices/config.yaml",
                     "gradio_api/file=/etc/passwd", f"gradio_api/file={shared.home}/exports/../secret"):
            assert client.get(path).status_code in (403, 404), path
    after = files_under(shared.home)
    assert {k for k in after if not k.startswith("runs/alices")} == {k for k in before if not k.startswith("runs/alices")}


def test_upload_bombs_and_long_lines_are_refused_before_the_server_holds_them(shared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    bob = visitor(shared, "bob")
    bob.predict("bundled", api_name="/describe_model")  # the server's own warm-up (a first model conversion) done
    rss_before = _rss_mib(shared.server.process.pid)
    bomb = tmp_path / "bomb.parquet"  # a few kilobytes of file, 30 MB of text once decompressed
    pq.write_table(pa.table({"text": ["a" * 1_000_000] * 30}), bomb, compression="zstd")
    assert bomb.stat().st_size < 100_000
    name = bob.predict(handle_file(str(bomb)), api_name="/upload_data")["data_path"]
    with pytest.raises(Exception, match="once decompressed"):
        bob.predict({"path": name}, "studio-tests/tiny", 0, api_name="/inspect_data")
    long_line = tmp_path / "long.jsonl"  # one row far over the per-row limit, beside good rows
    long_line.write_text(json.dumps({"text": "x" * 1_500_000}) + "\n" + "".join(
        json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    name = bob.predict(handle_file(str(long_line)), api_name="/upload_data")["data_path"]
    report = bob.predict({"path": name}, "studio-tests/tiny", 0, api_name="/inspect_data")
    assert report["bad_rows"][0]["row"] == 1 and "limit here" in report["bad_rows"][0]["reason"]
    assert "5 usable of 6 rows" in report["summary"] and report["file"] == name
    nested = tmp_path / "nested.jsonl"  # nested past the parser's depth: that row is bad, not the file
    nested.write_text("[" * 5000 + "]" * 5000 + "\n" + json.dumps({"text": "fine"}) + "\n")
    name = bob.predict(handle_file(str(nested)), api_name="/upload_data")["data_path"]
    report = bob.predict({"path": name}, "studio-tests/tiny", 0, api_name="/inspect_data")
    assert "1 usable of" in report["summary"] and "nested too deeply" in json.dumps(report["bad_rows"])
    assert _rss_mib(shared.server.process.pid) - rss_before < 150  # the reading happened in a sandboxed child
    with pytest.raises(Exception, match="would pass the 3 MB each visitor may keep"):
        filler = tmp_path / "filler.jsonl"
        filler.write_text(json.dumps({"text": "y" * 1_900_000}) + "\n")
        bob.predict(handle_file(str(filler)), api_name="/upload_data")
        bob.predict(handle_file(str(filler)), api_name="/upload_data")


def test_chat_replies_are_capped(shared):
    _, _, run_id = alices_run(shared)
    alice = visitor(shared, "alice")

    def reply(tokens: int) -> str:  # greedy: the same prompt and length give the same reply
        return alice.predict(run_id, "Tell me everything, at length.", "base", tokens, 0.0, api_name="/chat")
    capped, asked_much = reply(LIMITS["chat_max_new_tokens"]), reply(100000)
    assert asked_much == capped and capped != reply(8)  # 100,000 tokens asked for, the cap's worth given


def test_a_stuck_run_is_ended_after_its_grace_and_the_slot_is_free_again(shared):
    alice, _, run_id = alices_run(shared)
    status = alice.predict(run_id, api_name="/run_status")["status"]
    assert status["worker_pid"] == 0  # not shown; the slot's lock file says who trains
    holder = json.loads((shared.home / "training.lock").read_text())
    os.kill(holder["pid"], signal.SIGSTOP)  # stuck: it will never reach the end of its step
    try:
        assert "Stopping run alices" in alice.predict(api_name="/stop_training")
        wait_until(lambda: alice.predict(run_id, api_name="/run_status")["status"]["state"] == "interrupted",
                   timeout=120)
    finally:
        try:
            os.kill(holder["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "can resume" in alice.predict(run_id, api_name="/run_status")["status"]["message"]
    del shared.alice  # the next test that needs a live run of Alice's starts another


def test_an_abandoned_run_stops_itself_at_its_time_limit(shared):
    bob = visitor(shared, "bob")
    bob.predict({"name": "forgotten", "model": {"name_or_path": "studio-tests/tiny"},
                        "training": {**LONG, "time_limit_minutes": 0.05}}, api_name="/start_training")
    done = wait_until(lambda: (s := bob.predict("forgotten", api_name="/run_status"))["status"]["state"]
                      == "completed" and s, timeout=300)
    assert "time limit" in done["status"]["message"] and done["status"]["stopped_early"]
    assert (shared.home / "runs" / "forgotten" / "adapter" / "adapter_config.json").is_file()


def test_one_visitors_logout_leaves_other_sessions_logged_in(shared):
    with raw(shared, "bob") as first, raw(shared, "bob") as second:
        assert second.get("config").status_code == 200
        first.get("logout", follow_redirects=False)
        assert first.get("gradio_api/info").status_code in (401, 403)
        assert second.get("config").status_code == 200


def test_the_sandbox_bounds_memory_and_time():
    from studio import sandbox
    with pytest.raises(StudioError, match="more memory than the 200 MB"):
        sandbox.call("tests.test_attacks:_hog", {"mib": 1024}, seconds=60, memory_mb=200, what="The check")
    with pytest.raises(StudioError, match="took longer than 2 s"):
        sandbox.call("tests.test_attacks:_sleep", {"seconds": 30}, seconds=2, memory_mb=500, what="The check")
    assert sandbox.call("tests.test_attacks:_hog", {"mib": 10}, seconds=60, memory_mb=500) == 10


def _hog(mib: int) -> int:
    blocks = [bytearray(2**20) for _ in range(mib)]
    return len(blocks)


def _sleep(seconds: float) -> None:
    import time
    time.sleep(seconds)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _page_events_named(client, *names: str) -> dict:
    """The page's events by their handler's name (as the config lists them), to call with forged values."""
    found = {}
    for event in client.get("config").json()["dependencies"]:
        if event.get("api_name") in names:
            found.setdefault(event["api_name"], event["id"])
    assert set(found) == set(names), found
    return found


def test_a_forged_remembered_upload_or_mix_pick_reaches_no_other_visitors_file(shared, tmp_path):
    """The Data tab keeps the last upload's name in the browser (BrowserState) and a reload sends it back; a
    second file to mix in is picked among the visitor's uploads. Both values come from the client: Bob sends
    Alice's upload name and paths of his choosing straight to those events, and gets the demo set, a refusal,
    and only his own uploads listed."""
    alice = visitor(shared, "alice")
    data = tmp_path / "alice-mix.jsonl"
    data.write_text(json.dumps({"instruction": "secret question", "output": "secret answer"}) + "\n")
    alices = alice.predict(handle_file(str(data)), api_name="/upload_data")["data_path"]
    stored = next((shared.home / "uploads").rglob(alices))
    bob = visitor(shared, "bob")
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    bobs = bob.predict(handle_file(str(data)), api_name="/upload_data")["data_path"]
    before = files_under(shared.home / "uploads")
    forged = [alices, str(stored), f"../{stored.parent.name}/{alices}", f"{stored.parent.name}/{alices}",
              "/etc/passwd", "~/.ssh/id_rsa"]
    with raw(shared, "bob") as client:
        events = _page_events_named(client, "remembered", "mix_pick", "your_uploads")
        for value in forged:
            answer = page_event(client, events["remembered"], [value])
            # The data path itself is a server-side State (sent back as null); the source line beside it says it.
            assert answer.get("success") and answer["output"]["data"][1] == "Using: **demo set**", (value, answer)
            assert alices not in json.dumps(answer["output"]) and "secret" not in json.dumps(answer)
        # His own upload's name, kept by his browser, is used.
        own = page_event(client, events["remembered"], [bobs])
        assert own["output"]["data"][1] == f"Using: **{bobs}**"
        # The mix picker of one page session, filled with his own uploads as the page fills it, then sent
        # Alice's name and paths: refused (by the picker's choices, and again by the handler's own check).
        session = uuid.uuid4().hex[:12]
        listed = json.dumps(page_event(client, events["your_uploads"], [None], session)["output"])
        assert bobs in listed and alices not in listed
        for value in forged:
            refused = page_event(client, events["mix_pick"], [value, ""], session)
            assert not refused.get("success") and refused["output"].get("error"), (value, refused)
            assert "secret" not in json.dumps(refused)
        assert page_event(client, events["mix_pick"], [bobs, ""], session)["output"]["data"] == [f"{bobs}: 0.2"]
    # Start with Alice's upload mixed in: refused like the main file.
    with pytest.raises(Exception, match="demo set or a file you uploaded"):
        bob.predict({"name": "mixed", "model": {"name_or_path": "studio-tests/tiny"},
                     "data": {"path": bobs, "mix": {alices: 0.2}}}, api_name="/start_training")
    assert files_under(shared.home / "uploads") == before
