"""Rows that teach by comparison or by score rather than by example: preference pairs, unpaired feedback and
prompt-only rows. What each stage reads:

  preference  {"prompt": [turns ending on the user], "chosen": text, "rejected": text}   DPO, ORPO, SimPO, reward
  feedback    {"prompt": [turns ending on the user], "completion": text, "label": bool}   KTO
  prompts     {"prompt": [turns ending on the user], "answer": text or ""}                  GRPO (answer: a reference)

Shapes read (after data.columns renames):
- pairs: prompt/chosen/rejected (TRL's standard form, text, or its conversational form, lists of turns);
  messages or sharegpt conversations beside chosen and rejected replies (LLaMA-Factory's dpo_en_demo: a reply
  is text, a turn {from/role, value/content} or a list of turns); alpaca-style instruction/input with
  chosen/rejected; and chosen/rejected alone as whole conversations that share their opening (the prompt).
- feedback: a label or kto_tag (true/false, yes/no, 1/0, good/bad) beside prompt/completion, an alpaca row, or
  messages/conversations whose last turn is the reply being judged (LLaMA-Factory's kto_en_demo).
- prompts: prompt, question or instruction (+ input), or messages/conversations ending on the user (or on a
  reply, taken as the reference); the reference answer from answer, solution, reference, ground_truth, output
  or completion when there is one.

This module knows nothing about tokenizers; it raises ValueError naming what is wrong with a row.
"""

from __future__ import annotations

import json
from typing import Any

KINDS = {"preference": "preference_pairs", "feedback": "feedback", "prompts": "prompts"}
LABEL_KEYS = ("label", "kto_tag")
ANSWER_KEYS = ("answer", "solution", "reference", "ground_truth", "output", "completion")
_TRUE = {"true", "yes", "1", "good", "desirable", "positive", "chosen"}
_FALSE = {"false", "no", "0", "bad", "undesirable", "negative", "rejected"}
EXPECTED = {
    "preference": "'chosen' and 'rejected' replies, with 'prompt', 'messages', 'conversations' or 'instruction'",
    "feedback": "a 'label' (or 'kto_tag') of true/false, with 'prompt' and 'completion' or 'messages'",
    "prompts": "'prompt', 'question', 'instruction' or 'messages' (optional 'answer' as the reference)",
}


def detect(keys: set[str]) -> str | None:
    """Which of these row kinds the columns say, or None (then it is a conversation format, or unknown)."""
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if keys & set(LABEL_KEYS):
        return "feedback"
    return None


def normalise(rec: Any, fmt: str, system_prompt: str, text, turns) -> dict:
    """One raw record -> the normal form of its kind. `text` and `turns` are data.py's checked readers."""
    if not isinstance(rec, dict):
        raise ValueError(f"row is a {type(rec).__name__}, expected an object with named fields")
    if fmt == "preference":
        if "chosen" not in rec or "rejected" not in rec:
            raise ValueError("needs both 'chosen' and 'rejected'")
        prompt, chosen, rejected = _pair(rec, text, turns)
        if chosen.strip() == rejected.strip():
            raise ValueError("'chosen' and 'rejected' are the same reply, so there is nothing to prefer")
        return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected}
    if fmt == "feedback":
        label = _label(rec)
        prompt, completion = _prompt_and_reply(rec, text, turns, reply_keys=("completion", "output"))
        if completion is None:
            raise ValueError("has no reply to judge ('completion', 'output', or a last assistant turn)")
        return {"prompt": _with_system(prompt, system_prompt), "completion": completion, "label": label}
    if fmt == "prompts":
        prompt, reply = _prompt_and_reply(rec, text, turns, reply_keys=())
        answer = next((rec[k] for k in ANSWER_KEYS if rec.get(k) not in (None, "")), reply or "")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise ValueError("the reference answer is not text")
        return {"prompt": _with_system(prompt, system_prompt), "answer": answer}
    raise ValueError(f"unknown format {fmt}")


def _with_system(prompt: list[dict], system_prompt: str) -> list[dict]:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _label(rec: dict) -> bool:
    key = next((k for k in LABEL_KEYS if k in rec), None)
    value = rec.get(key) if key else None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"'{key or 'label'}' is {value!r}; it must be true or false (good or bad reply)")


def _reply(value: Any, what: str, text, turns) -> str:
    """A reply given as text, one turn, or a list of turns (the assistant's last turn is the reply)."""
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        try:
            value = json.loads(value)  # CSV cells hold turns as JSON text
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        parsed = _parse(value, what, turns)
        replies = [t["content"] for t in parsed if t["role"] == "assistant"]
        if not replies:
            raise ValueError(f"{what} has no assistant turn")
        return replies[-1]
    return text(value, what)


def _parse(value: list, what: str, turns) -> list[dict]:
    """Turns in either spelling: {role, content} or sharegpt's {from, value}."""
    from studio.data import SHAREGPT_ROLES
    first = value[0] if value and isinstance(value[0], dict) else {}
    if "from" in first or "value" in first:
        return turns(value, "from", "value", what, SHAREGPT_ROLES)
    return turns(value, "role", "content", what)


def _prompt_turns(rec: dict, text, turns) -> list[dict] | None:
    """The conversation a row holds before its reply, from whichever column carries it."""
    for key in ("messages", "conversations", "prompt"):
        value = rec.get(key)
        if isinstance(value, str) and key != "prompt":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"'{key}' is text, expected a list of turns") from None
        if isinstance(value, list) and value:
            return _parse(value, f"'{key}'", turns)
        if key == "prompt" and value not in (None, ""):
            return [{"role": "user", "content": text(value, "'prompt'")}]
    question = rec.get("question") if rec.get("question") not in (None, "") else rec.get("instruction")
    if question not in (None, ""):
        extra = text(rec.get("input"), "'input'", required=False)
        main = text(question, "'question'" if "question" in rec else "'instruction'")
        messages = [{"role": "user", "content": f"{main}\n\n{extra}" if extra.strip() else main}]
        system = text(rec.get("system"), "'system'", required=False)
        return ([{"role": "system", "content": system}] if system.strip() else []) + messages
    return None


def _prompt_and_reply(rec: dict, text, turns, reply_keys: tuple[str, ...]) -> tuple[list[dict], str | None]:
    """(turns ending on the user, the reply after them or None). A conversation ending on the assistant gives
    its last reply; one ending on the user is all prompt."""
    prompt = _prompt_turns(rec, text, turns)
    if prompt is None:
        raise ValueError("has no prompt ('prompt', 'question', 'instruction', 'messages' or 'conversations')")
    reply = next((_reply(rec[k], f"'{k}'", text, turns) for k in reply_keys if rec.get(k) not in (None, "")), None)
    if prompt[-1]["role"] == "assistant":
        reply, prompt = (prompt[-1]["content"] if reply is None else reply), prompt[:-1]
    _check_prompt(prompt)
    return prompt, reply


def _pair(rec: dict, text, turns) -> tuple[list[dict], str, str]:
    if _prompt_turns(rec, text, turns) is None:  # chosen and rejected are whole conversations
        chosen_turns = _whole(rec["chosen"], "'chosen'", turns)
        rejected_turns = _whole(rec["rejected"], "'rejected'", turns)
        shared = 0
        while shared < min(len(chosen_turns), len(rejected_turns)) - 1 and \
                chosen_turns[shared] == rejected_turns[shared]:
            shared += 1
        prompt = chosen_turns[:shared]
        if not prompt or chosen_turns[shared]["role"] != "assistant" or rejected_turns[shared]["role"] != "assistant":
            raise ValueError("'chosen' and 'rejected' are conversations that do not share an opening ending on "
                             "the user; give a 'prompt' column")
        _check_prompt(prompt)
        return prompt, chosen_turns[shared]["content"], rejected_turns[shared]["content"]
    prompt, _ = _prompt_and_reply(rec, text, turns, reply_keys=())  # a reply already in the conversation: dropped
    return prompt, _reply(rec["chosen"], "'chosen'", text, turns), _reply(rec["rejected"], "'rejected'", text, turns)


def _whole(value: Any, what: str, turns) -> list[dict]:
    from studio.data_shapes import json_cell
    value = json_cell(value, f"{what} is text and there is no prompt column; give a 'prompt' column")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} is not a conversation and there is no prompt column")
    return _parse(value, what, turns)


def _check_prompt(prompt: list[dict]) -> None:
    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    if not body:
        raise ValueError("the prompt is empty; add the user's turn")
    if body[0]["role"] != "user":
        raise ValueError("the prompt starts with the assistant; the first turn must be the user's")
    if body[-1]["role"] != "user":
        raise ValueError("the prompt does not end on the user's turn, so there is nothing to reply to")
    for i in range(1, len(body)):
        if body[i]["role"] == body[i - 1]["role"]:
            raise ValueError(f"two {body[i]['role']} turns in a row in the prompt")
