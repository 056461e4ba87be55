"""Preference pairs, feedback and prompt-only rows: every shape named in the issue normalises, bad rows say why,
and supervised fine-tuning refuses them naming the stage that reads them."""

import json

import pytest

from studio.config import DataConfig
from studio.data import load_report
from studio.errors import StudioError

USER, REPLY, WORSE = "What is 2+2?", "2 + 2 = 4.", "Five, probably."
PROMPT = [{"role": "user", "content": USER}]


def report(tmp_path, rows, kind, **data):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_report(DataConfig(path=str(path), **data), kind=kind)


PAIRS = {
    "TRL standard": {"prompt": USER, "chosen": REPLY, "rejected": WORSE},
    "TRL conversational": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": REPLY}],
                           "rejected": [{"role": "assistant", "content": WORSE}]},
    "LLaMA-Factory dpo_en_demo (sharegpt)": {"conversations": [{"from": "human", "value": USER}],
                                              "chosen": {"from": "gpt", "value": REPLY},
                                              "rejected": {"from": "gpt", "value": WORSE}},
    "messages with replies": {"messages": PROMPT, "chosen": {"role": "assistant", "content": REPLY},
                              "rejected": {"role": "assistant", "content": WORSE}},
    "alpaca with chosen/rejected": {"instruction": "What is", "input": "2+2?", "chosen": REPLY, "rejected": WORSE},
    "implicit prompt (whole conversations)": {"chosen": PROMPT + [{"role": "assistant", "content": REPLY}],
                                               "rejected": PROMPT + [{"role": "assistant", "content": WORSE}]},
}


@pytest.mark.parametrize("shape", PAIRS)
def test_preference_pairs_in_every_shape_normalise(tmp_path, shape):
    found = report(tmp_path, [PAIRS[shape]], "preference_pairs")
    assert found.format == "preference" and found.usable == 1
    example = found.examples[0]
    assert example["prompt"][-1]["role"] == "user" and USER.split()[0] in example["prompt"][-1]["content"]
    assert (example["chosen"], example["rejected"]) == (REPLY, WORSE)


def test_bad_pairs_say_why_and_the_rest_train(tmp_path):
    rows = [PAIRS["TRL standard"], {"prompt": USER, "chosen": REPLY, "rejected": REPLY},
            {"prompt": USER, "chosen": "", "rejected": WORSE},
            {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": REPLY, "rejected": WORSE}]
    found = report(tmp_path, rows, "preference_pairs")
    reasons = {b.row: b.reason for b in found.bad_rows}
    assert found.usable == 1
    assert "the same reply" in reasons[2] and "'chosen' is empty" in reasons[3] and "the prompt is empty" in reasons[4]


FEEDBACK = {
    "TRL unpaired": [{"prompt": USER, "completion": REPLY, "label": True},
                     {"prompt": USER, "completion": WORSE, "label": False}],
    "LLaMA-Factory kto_en_demo (messages + label)": [
        {"messages": PROMPT + [{"role": "assistant", "content": REPLY}], "label": True},
        {"messages": PROMPT + [{"role": "assistant", "content": WORSE}], "label": False}],
    "sharegpt + kto_tag": [
        {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": REPLY}], "kto_tag": "true"},
        {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": WORSE}], "kto_tag": "false"}],
    "alpaca + label": [{"instruction": USER, "output": REPLY, "label": 1}, {"instruction": USER, "output": WORSE,
                                                                           "label": 0}],
}


@pytest.mark.parametrize("shape", FEEDBACK)
def test_feedback_in_every_shape_keeps_its_labels(tmp_path, shape):
    found = report(tmp_path, FEEDBACK[shape], "feedback")
    assert found.format == "feedback"
    assert [(e["completion"], e["label"]) for e in found.examples] == [(REPLY, True), (WORSE, False)]
    assert all(e["prompt"] == PROMPT for e in found.examples)


def test_feedback_labels_are_checked_and_pairs_become_feedback(tmp_path):
    found = report(tmp_path, [{"prompt": USER, "completion": REPLY, "label": "maybe"},
                              {"prompt": USER, "completion": REPLY, "label": True}], "feedback")
    assert found.usable == 1 and "must be true or false" in found.bad_rows[0].reason
    pairs = report(tmp_path, [PAIRS["TRL standard"]], "feedback")  # KTO reads pairs as a good and a bad reply
    assert [(e["completion"], e["label"]) for e in pairs.examples] == [(REPLY, True), (WORSE, False)]


@pytest.mark.parametrize("row,answer", [
    ({"prompt": USER, "answer": "4"}, "4"),
    ({"prompt": PROMPT}, ""),
    ({"question": USER, "answer": 4}, "4"),
    ({"instruction": USER, "output": "4"}, "4"),
    ({"messages": PROMPT}, ""),
    ({"messages": PROMPT + [{"role": "assistant", "content": "4"}]}, "4"),
    ({"prompt": USER, "solution": "4"}, "4"),
])
def test_prompt_rows_with_an_optional_reference_answer(tmp_path, row, answer):
    found = report(tmp_path, [row], "prompts")
    assert found.format == "prompts" and found.examples == [{"prompt": PROMPT, "answer": answer}]


@pytest.mark.parametrize("rows,stage", [([PAIRS["TRL standard"]], "DPO, ORPO, SimPO or a reward model"),
                                         (FEEDBACK["LLaMA-Factory kto_en_demo (messages + label)"], "KTO")])
def test_supervised_fine_tuning_refuses_preference_and_feedback_naming_the_stage(tmp_path, rows, stage):
    with pytest.raises(StudioError, match=f"Train it with the {stage} stage"):
        report(tmp_path, rows, "conversations")


def test_a_conversation_file_for_a_preference_stage_says_what_is_expected(tmp_path):
    with pytest.raises(StudioError, match="'chosen' and 'rejected'"):
        report(tmp_path, [{"messages": PROMPT + [{"role": "assistant", "content": REPLY}]}], "preference_pairs")


# data.roles reaches every kind of row, not only conversations for supervised fine-tuning.
ROLE_ROWS = {
    "preference_pairs": {"conversations": [{"from": "customer", "value": USER}],
                         "chosen": {"from": "agent", "value": REPLY}, "rejected": {"from": "agent", "value": WORSE}},
    "feedback": {"messages": [{"role": "customer", "content": USER}, {"role": "Agent", "content": REPLY}],
                 "label": True},
    "prompts": {"messages": [{"role": "customer", "content": USER}], "answer": "4"},
}


@pytest.mark.parametrize("kind", ROLE_ROWS)
def test_role_mapping_applies_to_preference_feedback_and_prompt_rows(tmp_path, kind):
    rows = [ROLE_ROWS[kind]]
    with pytest.raises(StudioError, match="data.roles"):
        report(tmp_path, rows, kind)
    found = report(tmp_path, rows, kind, roles={"customer": "user", "agent": "assistant"})
    example = found.examples[0]
    assert example["prompt"] == PROMPT
    reply = {"preference_pairs": "chosen", "feedback": "completion", "prompts": "answer"}[kind]
    assert example[reply] == {"preference_pairs": REPLY, "feedback": REPLY, "prompts": "4"}[kind]


def test_role_mapping_applies_to_pairs_given_as_whole_conversations(tmp_path):
    row = {"chosen": [{"role": "client", "content": USER}, {"role": "bot", "content": REPLY}],
           "rejected": [{"role": "client", "content": USER}, {"role": "bot", "content": WORSE}]}
    found = report(tmp_path, [row], "preference_pairs", roles={"client": "user", "bot": "assistant"})
    assert found.examples[0] == {"prompt": PROMPT, "chosen": REPLY, "rejected": WORSE}
