"""Uploads remembered per visitor across reloads, and a second file to mix in picked among a visitor's own
uploads (or uploaded beside the first): the handlers, called as the page calls them, with values a client could
forge. tests/test_attacks.py calls the same events on a served shared studio."""

import json
from types import SimpleNamespace

import gradio as gr
import pytest

from studio.config import DEMO_DATA
from studio.service import Policy, Studio
from studio.ui import data_tab

pytestmark = pytest.mark.filterwarnings("ignore")


def who(name: str) -> SimpleNamespace:
    return SimpleNamespace(username=name)  # what visitor() reads from a gr.Request


def upload(studio, tmp_path, user: str, filename: str = "mine.jsonl") -> str:
    source = tmp_path / filename
    source.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n", encoding="utf-8")
    name, line, kept = data_tab.uploaded(studio, str(source), who(user))
    assert kept == name and line == f"Using: **{name}**" and not source.exists()
    return name


@pytest.fixture()
def shared():
    return Studio(Policy(share=True))


def test_the_last_upload_comes_back_after_a_reload(shared, tmp_path):
    name = upload(shared, tmp_path, "alice")
    # The page loads with what the browser kept: the same name, still Alice's upload.
    assert data_tab.remembered(shared, name, who("alice")) == (name, f"Using: **{name}**")
    # Nothing kept (a first visit, or the demo set chosen last): the page stays as it opens.
    for nothing in (None, ""):
        path, line = data_tab.remembered(shared, nothing, who("alice"))
        assert path.__class__ is line.__class__ is type(gr.skip())
    # The upload cleared: the demo set, and nothing to remember.
    assert data_tab.uploaded(shared, None, who("alice")) == (DEMO_DATA, data_tab.DEMO_SOURCE, None)


def test_a_forged_or_stale_remembered_value_is_not_used(shared, tmp_path, studio_home):
    alices = upload(shared, tmp_path, "alice")
    bobs = upload(shared, tmp_path, "bob", "bob.jsonl")
    folder = next(p for p in (studio_home / "uploads").iterdir() if (p / alices).is_file())
    forged = [alices, str(folder / alices), f"../{folder.name}/{alices}", "/etc/passwd", DEMO_DATA + "/../x",
              {"path": alices}, ["a"], 7]
    for value in forged:
        assert data_tab.remembered(shared, value, who("bob")) == (DEMO_DATA, data_tab.DEMO_SOURCE), value
    assert data_tab.remembered(shared, bobs, who("bob"))[0] == bobs
    # An upload removed since (uploads are cleaned up after a week) is not remembered either.
    (folder / alices).unlink()
    assert data_tab.remembered(shared, alices, who("alice"))[0] == DEMO_DATA


def test_a_second_file_to_mix_in_is_picked_among_a_visitors_own_uploads(shared, tmp_path):
    first = upload(shared, tmp_path, "alice", "first.jsonl")
    general = upload(shared, tmp_path, "alice", "general.jsonl")
    bobs = upload(shared, tmp_path, "bob", "bob.jsonl")
    picker = data_tab.your_uploads(shared, None, who("alice"))
    assert sorted(picker.choices, key=str) == sorted([(n, n) for n in (first, general)], key=str)
    assert [c[0] for c in data_tab.your_uploads(shared, None, who("carol")).choices] == []
    mix = data_tab.mix_pick(shared, general, "", who("alice"))
    assert mix == f"{general}: 0.2"
    assert data_tab.mix_pick(shared, general, mix, who("alice")) == mix  # picked twice: listed once
    for value in (bobs, f"../{bobs}", "/etc/passwd", None):
        with pytest.raises(gr.Error, match="your own uploads"):
            data_tab.mix_pick(shared, value, mix, who("alice"))
    # The mix lines become data.mix; Start resolves each name in the visitor's own folder.
    settings = data_tab.data_settings({}, first, data_tab.NONE, data_tab.NONE, data_tab.NONE, mix_files=mix)
    assert settings["mix"] == {general: "0.2"}  # the share as typed; the config reads it as a number


def test_a_second_file_uploaded_to_mix_in(shared, tmp_path):
    source = tmp_path / "general.jsonl"
    source.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n", encoding="utf-8")
    mix, picker = data_tab.mix_upload(shared, str(source), "other.jsonl: 0.1", who("alice"))
    stored = picker.value
    assert stored in [c[0] for c in picker.choices] and stored.startswith("general-")
    assert mix == f"other.jsonl: 0.1\n{stored}: 0.2" and not source.exists()
    assert shared.own_upload(stored, "alice") == stored and shared.own_upload(stored, "bob") is None


def test_the_data_tab_keeps_the_upload_name_in_browser_storage():
    """The page's wiring: the upload writes the name to a BrowserState; a page load reads it back through
    `remembered` into the data path; the demo button clears it."""
    studio = Studio()
    with gr.Blocks() as page:
        data = data_tab.build(studio)
    assert isinstance(data.last_upload, gr.BrowserState) and data.last_upload.default_value is None
    fns = list(page.fns.values())
    loads = [f for f in fns if getattr(f.fn, "__name__", "") == "remembered"]
    assert len(loads) == 1 and [c._id for c in loads[0].inputs] == [data.last_upload._id]
    assert [c._id for c in loads[0].outputs] == [data.data_path._id, data.source._id]
    assert any(t[1] == "load" for t in loads[0].targets)
    writers = [f for f in fns if data.last_upload._id in [c._id for c in f.outputs]]
    assert {getattr(f.fn, "__name__", "") for f in writers} >= {"uploaded"} and len(writers) == 2
