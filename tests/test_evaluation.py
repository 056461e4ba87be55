"""Evaluation (stages/evaluate.py, studio/evaluation.py): a finished run against its base on held-out rows or a
file, greedy, with measures, loss, the forgetting check, a judge, the report page and blind votes."""

import json
import math

import pytest

from studio.errors import StudioError
from studio.records import State
from studio.runs import new_run, open_run
from studio.service import Studio
from tests.conftest import tiny_config, train_here


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One finished tiny run, shared by the tests here (its own studio folder)."""
    import os
    home = tmp_path_factory.mktemp("eval-home")
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(home)
    try:
        run = new_run(tiny_config(tiny_model, training={"max_steps": 6, "learning_rate": 5e-3}))
        assert train_here(run).state is State.COMPLETED
    finally:
        if old is not None:
            os.environ["STUDIO_HOME"] = old
    return home, run.id


def _evaluate(trained, monkeypatch, **settings):
    from studio.stages.evaluate import config_for
    home, run_id = trained
    monkeypatch.setenv("STUDIO_HOME", str(home))
    cfg = config_for(run_id, **{"max_rows": 4, "max_new_tokens": 12, "forgetting": False, **settings})
    run = new_run(cfg)
    status = train_here(run)
    return run, status


def test_an_evaluation_answers_with_both_models_scores_them_and_saves_its_report(trained, monkeypatch):
    run, status = _evaluate(trained, monkeypatch, metrics="exact,contains,rouge_l")
    assert status.state is State.COMPLETED, status.message
    report = json.loads((run.path / "report.json").read_text())
    assert report["labels"] == {"base": "base", "tuned": trained[1]} and report["decoding"] == "greedy"
    assert len(report["rows"]) == 4 and report["metrics"] == ["exact", "contains", "rouge_l"]
    for row in report["rows"]:
        assert row["prompt"] and row["reference"] and isinstance(row["base"], str) and isinstance(row["tuned"], str)
        assert set(row["rouge_l"]) == {"base", "tuned"}
    assert report["summary"]["rouge_l"]["rows"] == 4
    for side in ("base", "tuned"):
        loss = report["loss"][side]
        assert loss["tokens"] > 0 and loss["perplexity"] == pytest.approx(math.exp(loss["loss"]), rel=1e-3)
    assert report["loss"]["tuned"]["loss"] < report["loss"]["base"]["loss"]  # it trained on rows like these
    assert status.message == report["headline"] and "Evaluated 4 rows" in status.message
    page = (run.path / "report.html").read_text()
    assert "<h1>Evaluation:" in page and "Every row" in page
    # The report travels with the evaluated run (and so with its exports).
    target = open_run(trained[1])
    assert json.loads((target.path / "evaluations" / run.id / "report.json").read_text())["run"] == target.id
    # Greedy: the same settings give the same answers.
    again, _ = _evaluate(trained, monkeypatch, metrics="exact,contains,rouge_l")
    assert [r["tuned"] for r in json.loads((again.path / "report.json").read_text())["rows"]] == \
        [r["tuned"] for r in report["rows"]]


def test_the_report_page_escapes_what_the_data_and_the_models_wrote():
    from studio.report_page import render
    evil = "<script>alert(1)</script>"
    report = {"labels": {"base": "base", "tuned": "run-x"}, "created": 0, "headline": evil, "data": evil,
              "settings": {"max_new_tokens": 8}, "evaluation_run": "eval-x", "metrics": ["exact"],
              "descriptions": {"exact": "same answer"}, "loss": {},
              "summary": {"exact": {"base_mean": 0.0, "tuned_mean": 1.0, "tuned_wins": 1, "base_wins": 0, "ties": 0}},
              "rows": [{"row": 1, "prompt": evil, "reference": evil, "base": evil, "tuned": evil,
                        "exact": {"base": 0.0, "tuned": 1.0}}]}
    page = render(report)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_an_evaluation_refuses_what_it_cannot_use(trained, monkeypatch, tmp_path):
    from studio.stages.evaluate import config_for
    home, run_id = trained
    monkeypatch.setenv("STUDIO_HOME", str(home))
    run, status = _evaluate(trained, monkeypatch, metrics="accuracy")
    assert status.state is State.FAILED and "not a measure" in status.message and "rouge_l" in status.message
    empty = tmp_path / "no-replies.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    run, status = _evaluate(trained, monkeypatch, data=str(empty))
    assert status.state is State.FAILED and "the last turn must be the assistant's reply" in status.message
    with pytest.raises(StudioError):
        config_for("no-such-run")


def _fake_evaluation(tiny_model, owner=""):
    """A finished run and an evaluation of it with a report of 6 rows (no model needed)."""
    target = new_run(tiny_config(tiny_model, model={"name_or_path": "bundled"}), owner=owner)
    target.update_status(state=State.COMPLETED)
    target.adapter_dir.mkdir()
    (target.adapter_dir / "adapter_config.json").write_text("{}")  # finished with an adapter, as far as lists go
    evaluation = new_run(tiny_config(tiny_model, name="eval-x"), owner=owner)
    rows = [{"row": i, "prompt": f"q{i}", "reference": "r", "base": f"base answer {i}", "tuned": f"tuned answer {i}"}
            for i in range(1, 7)]
    evaluation.write_json("report.json", {"run": target.id, "evaluation_run": evaluation.id, "rows": rows,
                                          "labels": {"base": "base", "tuned": target.id}})
    return target, evaluation


def test_blind_pairs_come_in_random_order_and_votes_count_for_the_right_model(tiny_model):
    from studio.service import Studio
    studio = Studio()
    target, evaluation = _fake_evaluation(tiny_model)
    seen_first = set()
    for _ in range(40):
        pair = studio.blind_next(evaluation.id, "local")
        seen_first.add("tuned" if pair["a"].startswith("tuned") else "base")
        assert {pair["a"].split()[0], pair["b"].split()[0]} == {"base", "tuned"}
    assert seen_first == {"base", "tuned"}  # both orders (a fixed order would fail 40 times in a row: 2**-39)
    pair = studio.blind_next(evaluation.id, "local")
    choice = "A" if pair["a"].startswith("tuned") else "B"
    tally = studio.blind_vote(pair["token"], choice, "local")
    assert tally == {"votes": 1, "tuned_wins": 1, "base_wins": 0, "ties": 0, "win_rate": 1.0}
    with pytest.raises(StudioError, match="no longer open"):
        studio.blind_vote(pair["token"], choice, "local")  # a pair is voted on once
    entry = json.loads((target.path / "votes.jsonl").read_text().splitlines()[0])
    assert entry["choice"] == "tuned" and entry["evaluation"] == evaluation.id
    pair = studio.blind_next(evaluation.id, "local")
    tally = studio.blind_vote(pair["token"], "tie", "local")
    assert tally["votes"] == 2 and tally["ties"] == 1 and tally["win_rate"] == 0.75
    # Rows already voted on are not shown again; after the last, the page is told so.
    for _ in range(4):
        pair = studio.blind_next(evaluation.id, "local")
        studio.blind_vote(pair["token"], "B", "local")
    with pytest.raises(StudioError, match="compared every row"):
        studio.blind_next(evaluation.id, "local")


def test_a_shared_link_keeps_evaluations_to_their_owner_and_judges_off(tiny_model):
    from studio.service import Policy, Studio, owner_key
    studio = Studio(Policy(share=True))
    target, evaluation = _fake_evaluation(tiny_model, owner=owner_key("alice"))
    with pytest.raises(StudioError, match="No run called"):
        studio.blind_next(evaluation.id, "mallory")
    pair = studio.blind_next(evaluation.id, "alice")
    with pytest.raises(StudioError, match="no longer open"):
        studio.blind_vote(pair["token"], "A", "mallory")  # someone else's open pair
    with pytest.raises(StudioError, match="No run called"):
        studio.start_evaluation({"run": target.id}, "mallory")
    for settings, words in (({"judge": "bundled", "rubric": "x"}, "judge model is turned off"),
                            ({"benchmark": "hellaswag"}, "only on the owner's own studio"),
                            ({"data": "/etc/passwd"}, "a file you uploaded"),
                            ({"against": "../x"}, "No run called"),
                            ({"surprise": 1}, "Unknown evaluation setting")):
        with pytest.raises(StudioError, match=words):
            studio.start_evaluation({"run": target.id, **settings}, "alice")
    # The general start endpoint is held to the same rules for an evaluation.
    from studio.config import to_dict
    from studio.stages.evaluate import config_for
    cfg = to_dict(config_for(target.id, judge="bundled", rubric="x"))
    with pytest.raises(StudioError, match="judge model is turned off"):
        studio.start(cfg, "alice")


FACTS = [("What is the capital of France?", "Paris"), ("What colour is the sky?", "Blue"),
         ("What do cows drink?", "Water"), ("Which animal says meow?", "Cat"),
         ("What is frozen water called?", "Ice"), ("What shines in the day?", "Sun")]


def _write(path, pairs):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in pairs), encoding="utf-8")
    return path


@pytest.fixture()
def small_probe(tmp_path, monkeypatch):
    """The forgetting check asking the six FACTS (the tiny model learns them first, so it has something to lose)."""
    from studio import evaluation, probe
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"id": f"f{i}", "prompt": q, "answer": a, "check": "contains",
                                        "topic": "facts"}) + "\n" for i, (q, a) in enumerate(FACTS)))
    monkeypatch.setattr(evaluation, "probe_items", lambda count=0: probe.load_probe(path))


def test_the_forgetting_check_flags_a_run_made_to_forget_and_not_one_that_did_not(tiny_model, tmp_path, small_probe):
    """A tiny model is taught six facts; a run on top of it taught to answer 'Banana.' to everything forgets them
    and is flagged; a run on top of it that barely moved forgets nothing and is not."""
    from studio.stages.evaluate import config_for
    facts = _write(tmp_path / "facts.jsonl", FACTS * 4)
    knows = new_run(tiny_config(tiny_model, name="knows", method={"method": "full"}, data={"path": str(facts),
                                "eval_fraction": 0.0}, training={"learning_rate": 3e-3, "max_steps": 40,
                                                                 "batch_size": 8, "save_steps": 100}))
    assert train_here(knows).state is State.COMPLETED
    banana = _write(tmp_path / "banana.jsonl", [(q, "Banana.") for q, _ in FACTS] * 4)
    verdicts, at_end = {}, {}
    for name, training in (("forgot", {"learning_rate": 3e-3, "max_steps": 30}),
                           ("kept", {"learning_rate": 1e-8, "max_steps": 1})):
        run = new_run(tiny_config(tiny_model, name=name, model={"start_from": knows.id}, method={"method": "full"},
                                  data={"path": str(banana), "eval_fraction": 0.2},
                                  training={**training, "batch_size": 8, "save_steps": 100, "eval_steps": 100,
                                            "forgetting_check": "on"}))
        trained = train_here(run)
        assert trained.state is State.COMPLETED
        # The check at the end of training (the whole model trained: the start answered before the first step)...
        at_end[name] = (json.loads((run.path / "forgetting.json").read_text()), trained.message,
                        Studio().snapshot(run.id, "local")["warnings"])
        # ...and the same check from an evaluation.
        evaluation = new_run(config_for(run.id, max_rows=2, max_new_tokens=8, forgetting=True))
        status = train_here(evaluation)
        assert status.state is State.COMPLETED, status.message
        verdicts[name] = json.loads((evaluation.path / "report.json").read_text())["forgetting"]
    forgot, kept = verdicts["forgot"], verdicts["kept"]
    assert forgot["base_right"] >= 5  # the run they start from knows the facts
    assert forgot["flagged"] and forgot["tuned_right"] <= 1 and "forgot" in forgot["message"].lower()
    assert not kept["flagged"] and kept["tuned_right"] == kept["base_right"] == forgot["base_right"]
    for name, verdict in verdicts.items():
        found, message, warnings = at_end[name]
        assert (found["flagged"], found["base_right"], found["tuned_right"]) == \
            (verdict["flagged"], verdict["base_right"], verdict["tuned_right"])
        assert f"Forgetting check: {found['message']}" in message
        assert warnings == ([found["message"]] if found["flagged"] else [])


def test_a_judge_model_grades_every_row_with_the_order_alternating(tiny_model):
    """The mechanism, not the judge's wisdom: the tiny model as judge (the bundled one is far slower on a CPU)."""
    from studio import evaluation
    from studio.config import ModelConfig
    from studio.inference import load_chat_model
    judge = load_chat_model("base", None, ModelConfig(name_or_path=str(tiny_model)))
    rows = [{"prompt": f"q{i}", "base": "a plain answer", "tuned": "Ahoy, matey! Arr!"} for i in range(4)]
    seen = []
    original = evaluation.generate_answers

    def recording(chat, conversations, max_new_tokens, **kwargs):
        seen.extend(c[-1]["content"] for c in conversations)
        return original(chat, conversations, max_new_tokens, **kwargs)
    evaluation.generate_answers = recording
    try:
        result = evaluation.judge_answers(judge, rows, "answers like a pirate")
    finally:
        evaluation.generate_answers = original
    assert result["judged"] == 4 and sum(result["wins"].values()) == 4 and len(result["verdicts"]) == 4
    assert "Answer A: a plain answer" in seen[0] and "Answer A: Ahoy" in seen[1]  # the order alternates
    assert all("Rubric: answers like a pirate" in text for text in seen)


@pytest.mark.slow
def test_the_bundled_model_can_judge(monkeypatch):
    """The issue's judge test: the bundled model, named as a person would ('bundled'), grades answers through the
    evaluation's own judge step; every row gets one of A, B, tie or 'unclear' and the counts add up."""
    from types import SimpleNamespace

    from studio.stages import evaluate
    rows = [{"prompt": "What is the capital of France?", "base": "Paris.", "tuned": "Ahoy, matey! Paris! Arr!"},
            {"prompt": "What is 2 + 2?", "base": "4", "tuned": "Ahoy! 4, matey. Arr!"}]
    said = []
    result = evaluate._judge(SimpleNamespace(judge="bundled", rubric="answers like a pirate"), rows,
                             SimpleNamespace(say=said.append))
    assert result["judge"] == "bundled" and result["judged"] == 2 and sum(result["wins"].values()) == 2
    assert all(v["picked"] in ("base", "tuned", "tie", "unclear") for v in result["verdicts"])
    assert said  # the page is told the judge is at work


def test_a_training_run_ends_with_the_forgetting_check(trained, monkeypatch):
    """training.forgetting_check 'auto' on a small model on a CPU: the LoRA run of the fixture asked the general
    questions of its base (adapter off) and of itself, and its verdict is in the run folder and its last message."""
    from studio.training.forgetting import CPU_AUTO_MAX_PARAMS, CPU_QUESTIONS, QUESTIONS, questions_for
    home, run_id = trained
    monkeypatch.setenv("STUDIO_HOME", str(home))
    run = open_run(run_id)
    found = json.loads((run.path / "forgetting.json").read_text())
    assert found["total"] == CPU_QUESTIONS == len(found["questions"])
    assert all({"base_reply", "tuned_reply", "base_passed", "tuned_passed"} <= set(q) for q in found["questions"])
    assert found["base_right"] == sum(q["base_passed"] for q in found["questions"])
    assert "Forgetting check:" in run.status().message
    assert not (run.path / "forgetting-base.json").exists()  # with an adapter the base answers at the end
    # 'auto' leaves it out only for big models on a CPU, and says why.
    assert questions_for("auto", "cpu", CPU_AUTO_MAX_PARAMS + 1)[0] == 0
    assert "Evaluate tab" in questions_for("auto", "cpu", CPU_AUTO_MAX_PARAMS + 1)[1]
    assert questions_for("auto", "cuda", 10 ** 10) == (QUESTIONS, "")
    assert questions_for("auto", "cpu", CPU_AUTO_MAX_PARAMS) == (CPU_QUESTIONS, "")
    assert questions_for("off", "cuda", 1) == (0, "") and questions_for("on", "cpu", 10 ** 10)[0] == QUESTIONS
