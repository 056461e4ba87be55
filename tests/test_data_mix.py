"""Duplicates, mixing in other data and self-replay, what a run says it read, and the Data tab's check of files
as found (issue 17). Rows are written in each test; every skipped or removed row is counted with its reason."""

import json

import pytest

from studio.config import DataConfig, ModelConfig
from studio.data import load_splits
from studio.errors import StudioError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def qa(q, a):
    return {"instruction": q, "output": a}


UNIQUE = [qa(f"Question number {i} about topic {i * 7}?", f"Answer {i}: it depends on {i * 3}.") for i in range(40)]


def test_exact_and_near_duplicates_counted_listed_and_removed(tmp_path):
    rows = [*UNIQUE,
            qa("question number 3 about topic 21", "answer 3 it depends on 9"),  # exact after normalising
            qa("Question number 3 about topic 21?", "Answer 3: it depends on 9."),  # exact
            qa("Tell me how photosynthesis works in green plants during a sunny summer day please",
               "Plants turn light water and carbon dioxide into sugar and oxygen inside their leaves every day"),
            qa("Tell me how photosynthesis works in green plants during a sunny summer day",
               "Plants turn light water and carbon dioxide into sugar and oxygen inside their leaves every day")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report_only = load_splits(DataConfig(path=path, eval_fraction=0), seed=0)
    assert report_only.duplicates["exact"] == 2 and report_only.duplicates["removed"] == 0
    assert len(report_only.train) == 44  # 'report' (the default) lists them and trains them all
    assert report_only.duplicates["groups"][0]["copies"] == 3
    exact = load_splits(DataConfig(path=path, eval_fraction=0, dedup="exact"), seed=0)
    assert len(exact.train) == 42 and exact.duplicates["removed"] == 2
    near = load_splits(DataConfig(path=path, eval_fraction=0, dedup="near"), seed=0)
    assert near.duplicates["near"] == 1 and near.duplicates["removed"] == 3 and len(near.train) == 41


def test_held_out_rows_repeating_training_rows_are_removed_and_counted(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", UNIQUE[:20])
    held_out = write_jsonl(tmp_path / "held.jsonl", [UNIQUE[3], UNIQUE[5], *UNIQUE[30:35]])
    reported = load_splits(DataConfig(path=train, eval_path=held_out), seed=0)
    assert reported.duplicates["held_out_repeats"] == 2 and len(reported.eval) == 7
    removed = load_splits(DataConfig(path=train, eval_path=held_out, dedup="exact"), seed=0)
    assert removed.duplicates["held_out_removed"] == 2 and len(removed.eval) == 5
    assert all(e not in removed.train for e in removed.eval)


def test_a_second_and_third_file_mixed_at_their_shares(tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", UNIQUE[:30])
    general = write_jsonl(tmp_path / "general.jsonl", [qa(f"General {i}?", f"Yes {i}.") for i in range(100)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"Question": f"Small {i}?", "Answer": f"No {i}."} for i in range(3)])
    splits = load_splits(DataConfig(path=own, eval_fraction=0.1, mix={general: 0.2, small: 0.1}), seed=1)
    # 27 training rows of one's own are 70% of the total: 27 / 0.7 x 0.2 = 8 general rows, x 0.1 = 4 small (3 exist).
    assert [(m["rows"], m["asked"]) for m in splits.mixed] == [(8, 8), (3, 4)]
    assert len(splits.train) == 27 + 8 + 3 and len(splits.eval) == 3
    texts = [e["messages"][0]["content"] for e in splits.train]
    assert sum(t.startswith("General") for t in texts) == 8 and sum(t.startswith("Small") for t in texts) == 3
    assert not any(e["messages"][0]["content"].startswith(("General", "Small")) for e in splits.eval)


def test_shares_that_leave_nothing_of_ones_own_are_refused(tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", UNIQUE[:10])
    with pytest.raises(StudioError, match="below 1"):
        load_splits(DataConfig(path=own, mix={own: 0.6}, replay_share=0.5), seed=0)


def test_self_replay_generated_once_cached_and_mixed(tmp_path):
    from studio import replay
    calls = []

    def fake_model(prompts):
        calls.append(len(prompts))
        return [f"My usual answer to: {p}" for p in prompts]
    own = write_jsonl(tmp_path / "own.jsonl", UNIQUE[:36])
    model = ModelConfig(name_or_path="some-model")
    cfg = DataConfig(path=own, eval_fraction=0, replay_share=0.1)
    first = load_splits(cfg, seed=0, model=model, generate=fake_model)
    second = load_splits(cfg, seed=0, model=model, generate=fake_model)
    assert calls == [40]  # generated once, then read from the cache
    assert first.mixed == second.mixed == [{"source": "self-replay", "rows": 4, "asked": 4, "share": 0.1}]
    replayed = [e for e in first.train if e["messages"][1]["content"].startswith("My usual answer")]
    assert len(replayed) == 4 and replay.cache_path(model).is_file()


def test_replay_prompts_are_not_the_forgetting_checks():
    from studio import replay
    from studio.paths import ASSETS_DIR
    probe = {json.loads(line)["prompt"].strip().lower()
             for line in (ASSETS_DIR / "probe" / "general.jsonl").read_text().splitlines() if line.strip()}
    mine = [p.strip().lower() for p in replay.prompts()]
    assert len(mine) >= 30 and not probe.intersection(mine)


def test_what_was_read_in_plain_lines(tmp_path):
    from studio.data_summary import lines
    rows = [*UNIQUE[:6], {"instruction": "Hi"}, {"instruction": "Yo"}, {"instruction": "x", "output": "{{name}}"},
            {"instruction": "y", "output": "I am {{name}}"}]
    for row in rows:
        row["source"] = "web"
    splits = load_splits(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0), seed=0)
    text = "\n".join(lines({**splits.details(), "file": "d.jsonl", "train_rows": 6, "eval_rows": 0,
                            "truncated": 2}))
    assert "alpaca format, 6 usable of 10 rows (6 training, 0 held out)" in text
    assert "Skipped 4 rows:" in text and "2 x 'output' is empty (rows 7, 8)" in text
    assert "2 x has the placeholder {{name}}" in text
    assert "2 rows cut to max length" in text and "Columns not used: source" in text


def test_data_tab_check_shows_mapping_placeholders_and_tools(tmp_path, tiny_model):
    from studio.service import Studio
    from studio.ui import data_tab
    studio = Studio()
    csv = tmp_path / "qa.csv"
    csv.write_text("Questions,Answers\nWie geht's?,Gut und über alles froh.\nWho?,{{name}} by {{author}}.\n"
                   "Why?,I am {{name}}.\n", encoding="utf-8")
    shown = data_tab.check(studio, data_tab.data_settings({"max_length": 64}, str(csv), data_tab.NONE, data_tab.NONE,
                                                          data_tab.NONE), str(tiny_model), 1)
    assert shown["mapped"]["instruction"] == "Questions" and shown["mapped"]["output"] == "Answers"
    assert "{{name}}" in shown["placeholders_label"] and "1 usable of 3 rows" in shown["summary"]
    assert "Questions -> instruction" in shown["summary"]
    assert "\ufffd" not in "".join(t for t, _ in shown["sample"]) and "über" in "".join(t for t, _ in shown["sample"])
    filled = data_tab.check(studio, data_tab.data_settings({"max_length": 64}, str(csv), "Questions", "Answers",
                                                           data_tab.NONE, "name: Ada\nauthor: Acme"),
                            str(tiny_model), 1)
    assert "3 usable of 3 rows" in filled["summary"] and "Ada by Acme." in filled["preview"].to_string()
    tools = tmp_path / "tools.jsonl"
    write_jsonl(tools, [{"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}])
    shown = data_tab.check(studio, {"path": str(tools), "max_length": 256}, str(tiny_model), 1)
    trained = "".join(t for t, label in shown["tool_sample"] if label == "trained")
    assert '"name": "w"' in trained and "sunny" not in trained


def test_studio_train_prints_what_was_read(tmp_path, capsys):
    """The terminal shows the data lines once, as soon as the worker has written data.json."""
    from studio import cli
    from studio.config import from_dict
    from studio.runs import new_run
    rows = [*UNIQUE[:5], {"instruction": "Hi"}, {"instruction": "Hi", "output": "I am {{name}}"},
            {"instruction": "Yo", "output": "I am {{name}}"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    splits = load_splits(DataConfig(path=path, eval_fraction=0), seed=0)
    run = new_run(from_dict({"data": {"path": path}}))
    shown = cli._Shown()
    cli._print_progress(run, shown, quiet=False)
    assert "Data:" not in capsys.readouterr().err  # nothing read yet
    run.write_json("data.json", {**splits.details(), "file": path, "train_rows": 5, "eval_rows": 0,
                                 "split_into_blocks": 1})
    cli._print_progress(run, shown, quiet=False)
    cli._print_progress(run, shown, quiet=False)
    err = capsys.readouterr().err
    assert err.count("Data: d.jsonl, alpaca format, 5 usable of 8 rows (5 training, 0 held out).") == 1
    assert "Skipped 3 rows:" in err and "1 x 'output' is empty (rows 6)" in err
    assert "2 x has the placeholder {{name}} with no value" in err
    assert "1 plain-text rows split into max-length blocks (nothing lost)" in err


def test_a_run_on_wild_data_with_self_replay_reports_everything(tmp_path, tiny_model, monkeypatch):
    """Tool calls, placeholders filled, a skipped image row and self-replay, trained by the worker's own code."""
    from studio import replay
    monkeypatch.setattr(replay, "MAX_NEW_TOKENS", 8)  # the tiny random model never stops by itself
    from studio.config import ModelConfig
    from studio.runs import new_run
    from tests.conftest import tiny_config, train_here
    call = {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'}
    rows = [{"conversations": [{"from": "human", "value": f"Weather in Oslo, day {i}?"}, call,
                               {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
             "tools": '[{"name": "weather", "parameters": {}}]'} for i in range(8)]
    rows += [{"conversations": [{"from": "human", "value": f"Who are you {i}?"},
                                {"from": "gpt", "value": "I am {{name}}."}]} for i in range(8)]
    rows.append({"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}],
                 "images": ["cat.png"]})
    path = write_jsonl(tmp_path / "wild.jsonl", rows)
    cfg = tiny_config(tiny_model, data={"path": path, "max_length": 160, "replay_share": 0.2,
                                        "placeholders": {"name": "Ada"}},
                      training={"max_steps": 1, "samples": 0, "save_steps": 1, "eval_steps": 1,
                                "forgetting_check": "off"})
    run = new_run(cfg)
    status = train_here(run)
    assert status.state.value == "completed", status.message
    found = run.read_json("data.json")
    assert found["usable"] == 16 and found["tool_rows"] == 8 and found["placeholders"] == {"name": 8}
    assert found["skipped"] == [{"reason": "it has a filled 'images' column: this model reads text only, so the "
                                           "row is skipped rather than trained on a placeholder",
                                 "rows": 1, "first_rows": [17]}]
    # 14 of one's own rows for training (2 held out) are 80%: 14 / 0.8 x 0.2 = 4 replay rows (3.5, rounded).
    assert found["mixed"][0]["source"] == "self-replay" and found["mixed"][0]["rows"] == 4
    assert found["train_rows"] == 18
    assert replay.cache_path(ModelConfig(name_or_path=str(tiny_model))).is_file()


def test_files_to_mix_in_are_checked_like_the_main_file_on_a_shared_studio(tmp_path, tiny_model):
    """A visitor of a shared link cannot make a run read a file of the machine through data.mix."""
    from studio.service import Policy, Studio
    studio = Studio(Policy(share=True))
    secret = write_jsonl(tmp_path / "secret.jsonl", UNIQUE[:5])
    with pytest.raises(StudioError, match="demo set or a file you uploaded"):
        studio.start({"model": {"name_or_path": "bundled"}, "data": {"path": "demo", "mix": {secret: 0.2}}}, "eve")


def test_data_tab_lists_repeated_rows(tmp_path, tiny_model):
    from studio.service import Studio
    from studio.ui import data_tab
    path = write_jsonl(tmp_path / "d.jsonl", [*UNIQUE[:6], UNIQUE[2], UNIQUE[2], UNIQUE[4]])
    shown = data_tab.check(Studio(), {"path": path, "max_length": 64}, str(tiny_model), 1)
    assert "Repeated rows: 3 exact, 0 near copies" in shown["summary"]
    assert '3 x "user: Question number 2 about topic 14?' in shown["summary"]
