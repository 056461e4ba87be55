"""studio.probe: the bundled general probe is well formed and self-consistent, and the verdict tells a real drop
from a wobble."""

import json

import pytest

from studio.errors import StudioError
from studio.probe import CHECKS, ProbeItem, answer_probe, load_probe, passes, verdict

WRONG_REPLY = "I am not sure."


@pytest.fixture(scope="module")
def probe():
    return load_probe()


def test_probe_has_60_to_100_unique_ids(probe):
    assert 60 <= len(probe) <= 100
    assert len({item.id for item in probe}) == len(probe)
    assert len({item.prompt for item in probe}) == len(probe)


def test_probe_items_are_complete(probe):
    for item in probe:
        assert item.prompt.strip() and item.answer.strip() and item.topic.strip(), item.id
        assert item.check in CHECKS, item.id
        assert bool(item.pattern) == (item.check == "regex"), item.id


def test_probe_covers_several_topics(probe):
    topics = {item.topic for item in probe}
    assert {"geography", "arithmetic", "science", "language", "instructions"} <= topics


@pytest.mark.parametrize("item", load_probe(), ids=lambda item: item.id)
def test_each_answer_passes_its_check_and_a_wrong_reply_fails(item):
    assert passes(item, item.answer), item
    assert not passes(item, WRONG_REPLY), item
    assert not passes(item, ""), item


def test_answers_pass_in_a_typical_full_sentence(probe):
    # Models rarely reply with the bare answer; a right answer inside a sentence must still count.
    sentence_checks = [item for item in probe if item.check in ("contains", "numeric")]
    for item in sentence_checks:
        assert passes(item, f"The answer is {item.answer}."), item


def test_numeric_answers_fail_when_off_by_one(probe):
    for item in (item for item in probe if item.check == "numeric"):
        assert not passes(item, f"The answer is {int(item.answer) + 1}."), item


def test_typical_replies_of_a_small_model():
    items = {item.id: item for item in load_probe()}
    assert passes(items["geo-01"], "The capital of France is Paris.")
    assert passes(items["math-01"], "2 + 3 = 5")
    assert not passes(items["math-01"], "2 + 3 = 6")
    assert passes(items["day-01"], "There are seven days in a week.")
    assert passes(items["instr-01"], "Yes.")
    assert not passes(items["instr-01"], "Yes, I can do that.")  # "only the word yes"
    assert passes(items["sci-07"], "Water freezes at 0°C (32°F).")
    assert not passes(items["sci-07"], "Water freezes at 32 degrees.")


def write_probe(tmp_path, rows):
    path = tmp_path / "probe.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_load_probe_from_a_file(tmp_path):
    path = write_probe(tmp_path, [{"id": "a", "prompt": "2+2?", "answer": "4", "check": "numeric", "topic": "math"}])
    assert load_probe(path) == [ProbeItem(id="a", prompt="2+2?", answer="4", check="numeric", topic="math")]


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "prompt": "p", "answer": "x", "check": "fuzzy"}, "'fuzzy' is not one of"),
    ({"id": "a", "prompt": "p", "answer": "x", "check": "regex"}, "needs a 'pattern'"),
    ({"id": "a", "prompt": "p", "answer": "x", "check": "regex", "pattern": "(x"}, r"'\(x'"),
    ({"id": "a", "prompt": "p", "answer": "Rome", "check": "contains", "pattern": ""}, None),
    ({"id": "a", "prompt": "p", "answer": "Rome", "check": "exact", "topic": "t", "extra": 1}, None),
    ({"id": "a", "prompt": "", "answer": "x", "check": "exact"}, "has no prompt"),
    ({"id": "a", "prompt": "p", "answer": "cat", "check": "regex", "pattern": "dog"}, "fails its regex check"),
])
def test_load_probe_refuses_bad_rows_with_a_reason(tmp_path, row, message):
    path = write_probe(tmp_path, [row])
    if message is None:
        assert len(load_probe(path)) == 1
    else:
        with pytest.raises(StudioError, match=message):
            load_probe(path)


def test_load_probe_refuses_duplicate_ids_and_missing_files(tmp_path):
    row = {"id": "same", "prompt": "p", "answer": "x", "check": "exact"}
    with pytest.raises(StudioError, match="'same' is used twice"):
        load_probe(write_probe(tmp_path, [row, row]))
    with pytest.raises(StudioError, match="not found"):
        load_probe(tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(StudioError, match="line 1 is not valid JSON"):
        load_probe(tmp_path / "broken.jsonl")


def test_answer_probe_passes_all_prompts_in_order(probe):
    calls = []

    def generate(prompts):
        calls.append(list(prompts))
        return [f"reply to {p}" for p in prompts]

    replies = answer_probe(generate, probe[:3])
    assert calls == [[item.prompt for item in probe[:3]]]
    assert replies == [f"reply to {item.prompt}" for item in probe[:3]]


def test_answer_probe_refuses_a_short_answer_list(probe):
    with pytest.raises(ValueError, match="2 replies for 3 prompts"):
        answer_probe(lambda prompts: ["a", "b"], probe[:3])


def test_verdict_flags_a_big_drop_and_names_the_counts():
    base = [True] * 58 + [False] * 22
    tuned = [True] * 41 + [False] * 39
    result = verdict(base, tuned)
    assert result.flagged
    assert (result.base_right, result.tuned_right, result.total) == (58, 41, 80)
    assert result.drop == pytest.approx(17 / 80)
    assert result.forgotten == list(range(41, 58))
    assert "41 of 80" in result.message and "58" in result.message
    assert "forgotten" in result.message and "learning rate" in result.message


def test_verdict_does_not_flag_a_one_question_wobble():
    base = [True] * 58 + [False] * 22
    tuned = list(base)
    tuned[0] = False
    result = verdict(base, tuned)
    assert not result.flagged
    assert result.forgotten == [0]
    assert "57 of 80" in result.message and "58" in result.message
    assert "forgotten" not in result.message


def test_verdict_on_a_small_probe_needs_more_than_two_flips():
    # 2 of 10 is a 20% drop, over the threshold, yet only two questions: a wobble.
    assert not verdict([True] * 10, [True] * 8 + [False] * 2).flagged
    assert verdict([True] * 10, [True] * 7 + [False] * 3).flagged


def test_verdict_swaps_are_measured_net():
    # Ten forgotten and ten newly right: the same score, nothing flagged, but the forgotten ones are listed.
    base = [True] * 10 + [False] * 10
    tuned = [False] * 10 + [True] * 10
    result = verdict(base, tuned)
    assert not result.flagged and result.drop == 0
    assert result.forgotten == list(range(10))


def test_verdict_reassures_when_the_tuned_model_does_better():
    result = verdict([False] * 5 + [True] * 5, [True] * 10)
    assert not result.flagged and result.drop < 0
    assert "10 of 10" in result.message and "kept what it knew" in result.message


def test_verdict_quotes_a_forgotten_question_when_given_the_items(probe):
    base = [True] * len(probe)
    tuned = [False] * len(probe)
    result = verdict(base, tuned, items=probe)
    assert probe[0].prompt in result.message


def test_verdict_threshold_is_respected():
    base, tuned = [True] * 100, [True] * 85 + [False] * 15
    assert verdict(base, tuned, threshold=0.1).flagged
    assert not verdict(base, tuned, threshold=0.2).flagged


def test_verdict_refuses_mismatched_or_empty_lists():
    with pytest.raises(StudioError, match="same probe"):
        verdict([True, False], [True])
    with pytest.raises(StudioError, match="no questions"):
        verdict([], [])
