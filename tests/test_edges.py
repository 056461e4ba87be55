"""Edges a shared studio's attackers found: a full disk at every write, YAML aliases, a run resumed after its
last step, a hub model's revision, a chat template that never finishes."""

import errno
import json
import shutil
from pathlib import Path

import pytest

from studio.errors import StudioError
from studio.records import State
from studio.runs import new_run
from tests.conftest import tiny_config, train_here


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_half_made_run_upload_or_export(tiny_model, tmp_path, monkeypatch, studio_home):
    from studio import runs
    from studio.service import Policy, Studio
    studio = Studio(Policy(share=True))
    done = new_run(tiny_config(tiny_model, name="done", training={"max_steps": 2}))
    train_here(done)
    upload = tmp_path / "rows.jsonl"
    upload.write_text(json.dumps({"text": "hi"}) + "\n")
    with monkeypatch.context() as m:
        m.setattr(runs, "write_atomic", _disk_full)
        with pytest.raises(StudioError, match="The disk is full, so the run could not be created"):
            new_run(tiny_config(tiny_model, name="no-room"))
    assert not (studio_home / "runs" / "no-room").exists()
    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", _disk_full)
        with pytest.raises(StudioError, match="The disk is full, so the upload was not stored"):
            studio.store_upload(str(upload), "alice")
    assert not any(p.is_file() for p in (studio_home / "uploads").rglob("*"))
    import zipfile
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "write", _disk_full)
        with pytest.raises(StudioError, match="The disk is full, so the export was not written"):
            Studio().export("done", "adapter", "local")
    assert not any((studio_home / "exports").rglob("*"))


def test_yaml_aliases_are_refused_in_presets_overrides_and_run_configs(tmp_path, tiny_model):
    from studio.presets import load_run_config
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")
    with pytest.raises(StudioError, match="line 2 uses the YAML alias \\*a; settings files do not allow aliases"):
        load_run_config(bomb)
    good = tmp_path / "good.yaml"
    good.write_text(f"model: {{name_or_path: {tiny_model}}}\n")
    with pytest.raises(StudioError, match="--set name.*alias"):
        load_run_config(good, ["name=*x"])
    run = new_run(tiny_config(tiny_model, name="aliased"))
    (run.path / "config.yaml").write_text("name: &n aliased\nmodel: {name_or_path: *n}\n")
    with pytest.raises(StudioError, match="cannot be read.*alias"):
        run.config()


def test_a_run_resumed_after_its_last_step_never_trains_past_it(tiny_model):
    """Cut off while saving its adapter after the last step: resuming saves the last checkpoint's weights and
    trains nothing more (it used to train step 5 of 4)."""
    from safetensors.torch import load_file
    run = new_run(tiny_config(tiny_model, training={"max_steps": 4, "save_steps": 2, "eval_steps": 100}))
    assert train_here(run).state is State.COMPLETED
    shutil.rmtree(run.adapter_dir)
    run.update_status(state=State.INTERRUPTED)
    status = train_here(run, resume=True)
    assert status.state is State.COMPLETED and status.step == 4, status
    assert [m.step for m in run.metrics() if m.is_training] == [1, 2, 3, 4]
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    last = load_file(run.checkpoints_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert saved.keys() == last.keys() and all((saved[k] == last[k]).all() for k in saved)


def test_a_hub_models_revision_is_the_one_loaded(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from studio import models
    repo = tmp_path / "hub" / "models--someone--tiny"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert Path(models.resolve("someone/tiny")).name == "a" * 40
    assert Path(models.resolve("someone/tiny", "v2")).name == "b" * 40


def test_a_chat_template_that_takes_too_long_fails_the_run_with_what_to_do(tiny_model, monkeypatch):
    from studio.limits import Limits
    slow = ("{% for message in messages %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
            "{% endfor %}{{ message['content'] }}"
            "{% endfor %}")
    monkeypatch.setenv("STUDIO_LIMITS", Limits(template_seconds=0.5).to_env())
    run = new_run(tiny_config(tiny_model, model={"chat_template": slow}))
    status = train_here(run)
    assert status.state is State.FAILED and "took the chat template more than 0.5 s" in status.message
    assert "built-in one" in status.message
