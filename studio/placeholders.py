"""Placeholders such as {{name}} and {{author}} in example conversations (LLaMA-Factory's identity.json, the
usual "rename your model" file): found, filled in with the person's values, or kept literally only when asked.

Training on the placeholder itself teaches the model to say "I am {{name}}", so a row with a recurring placeholder
that has no value is skipped (and counted, with the names missing) unless data.keep_placeholders is on
(studio.data decides which names recur).
"""

from __future__ import annotations

import re

PATTERN = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_\- ]{0,40}?)\s*\}\}")


def found_in(messages: list[dict]) -> list[str]:
    """Placeholder names in the conversation, in order of first appearance."""
    names: list[str] = []
    for message in messages:
        for name in PATTERN.findall(message.get("content") or ""):
            if name not in names:
                names.append(name)
    return names


def missing_reason(names: list[str]) -> str:
    shown = ", ".join("{{" + n + "}}" for n in names)
    return (f"has the placeholder {shown} with no value; give it a value (data.placeholders, or 'Placeholder "
            "values' on the Data tab), or set data.keep_placeholders to train it literally")


def fill(messages: list[dict], values: dict) -> list[dict]:
    """The conversation with every placeholder that has a value filled in (the others left as they are)."""
    values = {str(k).strip(): str(v) for k, v in (values or {}).items() if str(v).strip()}
    if not values:
        return messages

    def replace(match: re.Match) -> str:
        return values.get(match.group(1), match.group(0))
    return [{**m, "content": PATTERN.sub(replace, m["content"])} if m.get("content") else m for m in messages]


def parse_values(text: str) -> dict:
    """'name: Ada' lines (or 'name=Ada') -> {"name": "Ada"}; what the Data tab's box holds."""
    values = {}
    for line in (text or "").splitlines():
        for sep in (":", "="):
            if sep in line:
                key, value = line.split(sep, 1)
                key = key.strip().strip("{}").strip()
                if key:
                    values[key] = value.strip()
                break
    return values
