"""Turns of a conversation as files in the wild write them, read into the studio's one message form.

The one form (what ``studio.rendering`` renders through the chat template):

  {"role": "system" | "user" | "assistant" | "tool", "content": str,
   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}],   # assistant, optional
   "reasoning_content": str,                                                           # assistant, optional
   "train": False}                                                  # only when the row says: do not learn this turn

Shapes read here:
- content as text, a number, or a list of parts: OpenAI/HF ``{"type": "text", "text": ...}``, LLaMA-Factory's
  ``{"type": "text", "value": ...}``, ``reasoning``/``thinking`` parts, ``tool_call`` parts (a JSON call);
  image, audio, video and file parts are refused (the studio trains text-only models);
- OpenAI ``tool_calls`` on assistant turns, the ``tool`` role (and the older ``function`` role), sharegpt's
  ``function_call`` and ``observation`` turns (glaive tool-calling data);
- a per-turn ``loss_weight`` (LLaMA-Factory) or ``weight`` (OpenAI fine-tuning files): 0 means the turn is
  shown to the model but not learned;
- a ``tools`` column (JSON text or a list), bare function schemas or ``{"type": "function", ...}`` ones.

This module knows nothing about tokenizers; a problem with a row is a ValueError with the reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# Role names as files write them -> the studio's roles. sharegpt's function_call is the assistant calling a tool.
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_PARTS = ("reasoning", "thinking")
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video", "video_url",
               "file", "input_file")
MEDIA_COLUMNS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_TAGS = re.compile(r"<(image|video|audio)>")
TEXT_ONLY = "this model reads text only, so the row is skipped rather than trained on a placeholder"


def json_cell(value: Any, problem: str) -> Any:
    """A nested value as files hold it: as is, or parsed from its JSON text (CSV cells hold lists as text);
    text that is not JSON raises ValueError(problem)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(problem) from None


def read_turns(value: Any, role_key: str, content_key: str, what: str, roles: dict) -> list[dict]:
    """A list of turns (or its JSON text, as CSV cells hold it) -> messages in the one form."""
    value = json_cell(value, f"{what} is text, expected a list of turns")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} is {'empty' if value in (None, [], '') else 'not a list of turns'}")
    messages: list[dict] = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object with '{role_key}' and '{content_key}'")
        raw_role = str(turn.get(role_key, "")).strip()
        role = roles.get(raw_role.lower())
        if role is None:
            raise ValueError(f"turn {i} has unknown role '{raw_role}'; use {', '.join(sorted(set(roles.values())))}, "
                             f"or map it in data.roles (e.g. {raw_role or 'bot'}: assistant)")
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if raw_role.lower() == "function_call":  # sharegpt: the turn's text is the call itself
            message = {"role": "assistant", "content": "", "tool_calls": [tool_call(content, f"turn {i}")]}
        else:
            message = read_message(role, content, turn, f"turn {i} ({role})")
        messages.append(message)
    return merge_call_turns(messages)


def read_message(role: str, content: Any, turn: dict, what: str) -> dict:
    text, reasoning, calls = read_content(content, what)
    calls += [tool_call(c, what) for c in _as_list(turn.get("tool_calls"), what)]
    for key in ("reasoning_content", "reasoning", "thinking"):
        if isinstance(turn.get(key), str) and turn[key].strip():
            reasoning = turn[key] if not reasoning else f"{reasoning}\n{turn[key]}"
    if not text.strip() and not calls:
        raise ValueError(f"{what} is empty")
    if MEDIA_TAGS.search(text):
        raise ValueError(f"{what} holds {MEDIA_TAGS.search(text).group(0)}: {TEXT_ONLY}")
    message: dict = {"role": role, "content": text}
    if calls:
        if role != "assistant":
            raise ValueError(f"{what} calls a tool, but only the assistant calls tools")
        message["tool_calls"] = calls
    if reasoning.strip():
        message["reasoning_content"] = reasoning
    if _weight(turn) == 0:
        message["train"] = False
    if role == "tool" and turn.get("tool_call_id"):
        message["tool_call_id"] = str(turn["tool_call_id"])
    return message


def read_content(content: Any, what: str) -> tuple[str, str, list[dict]]:
    """(text, reasoning, tool calls) of a turn's content: text, a number, or a list of parts."""
    if content is None:
        return "", "", []
    if isinstance(content, (bool, dict)):
        raise ValueError(f"{what} holds a {type(content).__name__}, expected text")
    if isinstance(content, (int, float)):
        return str(content), "", []  # a numeric answer such as 42 is legitimate text
    if isinstance(content, str):
        return content, "", []
    if not isinstance(content, list):
        raise ValueError(f"{what} holds a {type(content).__name__}, expected text")
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(content, start=1):
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{what} holds a list that is not parts like {{\"type\": \"text\", \"text\": ...}}; "
                             "expected text")
        kind = str(part["type"]).lower()
        value = part.get(kind) if isinstance(part.get(kind), str) else part.get("text", part.get("value"))
        if kind in MEDIA_PARTS:
            raise ValueError(f"{what} has an {kind} part: {TEXT_ONLY}")
        if kind in TEXT_PARTS:
            texts.append(_part_text(value, what, j))
        elif kind in REASONING_PARTS:
            reasoning.append(_part_text(value, what, j))
        elif kind in ("tool_call", "function_call"):
            calls.append(tool_call(part.get("value", part.get(kind, part.get("text"))), what))
        else:
            raise ValueError(f"{what}: part {j} is of type '{kind}', which the studio does not read "
                             "(it reads text, reasoning and tool_call parts)")
    # Parts of one turn are pieces of one text (LLaMA-Factory and OpenAI both concatenate them).
    return "".join(texts), "\n".join(reasoning), calls


def _part_text(value: Any, what: str, j: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what}: part {j} has no text")
    return value


def _weight(turn: dict) -> float | None:
    for key in ("loss_weight", "weight"):
        value = turn.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _as_list(value: Any, what: str) -> list:
    if value in (None, "", []):
        return []
    value = json_cell(value, f"{what}: tool_calls is not valid JSON")
    return value if isinstance(value, list) else [value]


def tool_call(value: Any, what: str) -> dict:
    """One call in the form chat templates read: {"type": "function", "function": {"name", "arguments": dict}}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{what}: a tool call is not valid JSON ({value[:60]!r})") from None
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = {**value["function"], **({"id": value["id"]} if value.get("id") else {})}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ValueError(f"{what}: a tool call needs a 'name' and 'arguments'")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"{what}: the arguments of tool call '{value['name']}' are not valid JSON") from None
    call = {"type": "function", "function": {"name": value["name"], "arguments": arguments}}
    if value.get("id"):
        call["id"] = str(value["id"])
    return call


def merge_call_turns(messages: list[dict]) -> list[dict]:
    """sharegpt writes a reply and the call it makes as two turns (gpt, then function_call); chat templates
    want one assistant turn holding both. Consecutive tool results stay separate (templates group them)."""
    merged: list[dict] = []
    for message in messages:
        before = merged[-1] if merged else None
        if (before is not None and message["role"] == before["role"] == "assistant" and message.get("tool_calls")
                and not before.get("tool_calls") and not message["content"].strip()):
            before["tool_calls"] = message["tool_calls"]
            continue
        merged.append(message)
    return merged


def read_tools(value: Any) -> list[dict] | None:
    """A row's tools column -> [{"type": "function", "function": {...}}], None when it has none."""
    if value in (None, "", [], "[]"):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("'tools' is not valid JSON; it should be a list of function descriptions") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("'tools' should be a list of function descriptions")
    tools = []
    for tool in value:
        if "function" not in tool and not tool.get("name"):
            raise ValueError("a tool in 'tools' has no name")
        tools.append(tool if isinstance(tool.get("function"), dict) else {"type": "function", "function": tool})
    return tools or None


def media_in_row(rec: dict) -> str | None:
    """Why a row is for a vision or audio model (a filled images/videos/audios column), or None."""
    for column in MEDIA_COLUMNS:
        value = rec.get(column)
        if value not in (None, "", []):
            return f"it has a filled '{column}' column: {TEXT_ONLY}"
    return None


def check_conversation(messages: list[dict]) -> None:
    """Structural rules every chat template relies on; raises ValueError naming the turn."""
    for i, msg in enumerate(messages, start=1):
        if msg["role"] == "system" and i > 1:
            raise ValueError(f"system message in the middle (turn {i}); move it to the start")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("only a system message; add a user turn and the assistant's reply")
    if body[0]["role"] != "user":
        raise ValueError("starts with the assistant; the first turn after any system message must be the user's")
    offset = len(messages) - len(body)
    for j in range(1, len(body)):
        who, before = body[j]["role"], body[j - 1]["role"]
        if who == "tool":
            if before not in ("assistant", "tool") or (before == "assistant" and not body[j - 1].get("tool_calls")):
                raise ValueError(f"tool result at turn {j + offset + 1} does not follow an assistant turn that "
                                 "calls a tool")
        elif who == before:
            raise ValueError(f"two {who} turns in a row (turns {j + offset} and {j + offset + 1}); merge them "
                             "or put the other speaker's turn between")
    if body[-1]["role"] != "assistant":
        raise ValueError(f"ends on a {body[-1]['role']} turn; the last turn must be the assistant's reply to learn "
                         "from")
