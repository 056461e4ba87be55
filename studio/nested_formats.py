"""Data whose conversations are nested rather than one per row: flattened into conversations here.

- Open-Assistant trees: a row that is a prompt node ({"text", "role", "replies": [nodes]}), or a tree export
  ({"prompt": node, ...}). Each tree becomes one conversation that follows the best-ranked reply at every turn
  (rank 0 is best; unranked replies come after ranked ones, in file order).
- Open-Assistant's flat messages export: one message a row, linked by message_id/parent_id; the rows are put
  back into trees first, then read as above.
- Alpaca's seed_tasks: an instruction with a list of 'instances' ({input, output}); each instance is one
  conversation.

What cannot be flattened is refused with a message that says what to do, never with a column-mapping hint (a
mapping renames columns; it cannot unnest them).
"""

from __future__ import annotations

from typing import Any

OASST_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
FLAT_KEYS = {"message_id", "parent_id", "text", "role"}


def kind_of(rec: Any) -> str | None:
    """'oasst_tree' or 'seed_tasks' when the row is nested data of that kind, else None."""
    if not isinstance(rec, dict):
        return None
    if _is_node(rec) or (isinstance(rec.get("prompt"), dict) and _is_node(rec["prompt"])):
        return "oasst_tree"
    if isinstance(rec.get("instances"), list) and "instruction" in rec:
        return "seed_tasks"
    return None


def _is_node(value: Any) -> bool:
    return isinstance(value, dict) and "text" in value and "role" in value and isinstance(value.get("replies"), list)


def is_flat_messages(records: list) -> bool:
    return bool(records) and all(isinstance(r, dict) and FLAT_KEYS <= set(r) for _, r in records)


def assemble_flat(records: list) -> list:
    """Open-Assistant's flat export (one message a row) -> one tree per root message, numbered by the root's row."""
    nodes = {}
    for number, rec in records:
        nodes[rec["message_id"]] = {**rec, "replies": [], "_row": number}
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.get("parent_id"))
        (parent["replies"] if parent is not None else roots).append(node)
    return [(root["_row"], root) for root in roots]


def flatten(rec: dict, kind: str) -> list[dict]:
    """One nested row -> its conversations ({"messages": [...]}) or alpaca rows; ValueError with the reason."""
    if kind == "seed_tasks":
        rows = []
        for instance in rec["instances"]:
            if not isinstance(instance, dict) or not str(instance.get("output", "")).strip():
                continue
            rows.append({"instruction": rec["instruction"], "input": instance.get("input", ""),
                         "output": instance["output"]})
        if not rows:
            raise ValueError("its 'instances' hold no output to learn")
        return rows
    node = rec if _is_node(rec) else rec["prompt"]
    messages = []
    while node is not None:
        role = OASST_ROLES.get(str(node.get("role", "")).lower())
        if role is None:
            raise ValueError(f"a message has role '{node.get('role')}'; Open-Assistant data uses prompter and "
                             "assistant")
        if node.get("deleted") or not isinstance(node.get("text"), str) or not node["text"].strip():
            break  # a deleted or empty message ends the conversation where it stands
        messages.append({"role": role, "content": node["text"]})
        node = best_reply(node["replies"])
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a prompt nobody answered teaches nothing
    if not messages:
        raise ValueError("this Open-Assistant tree has no reply to its prompt")
    return [{"messages": messages}]


def best_reply(replies: list) -> dict | None:
    usable = [r for r in replies if isinstance(r, dict) and not r.get("deleted")]
    if not usable:
        return None
    order = {id(r): i for i, r in enumerate(usable)}
    return min(usable, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, order[id(r)]))


def nested_columns(records: list, limit: int = 50) -> list[str]:
    """Columns whose values are objects or lists of objects (in the first rows): data a mapping cannot flatten."""
    found = []
    for _, rec in records[:limit]:
        if not isinstance(rec, dict):
            continue
        for key, value in rec.items():
            nested = isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list))
                                                                                  for v in value))
            if nested and key not in found:
                found.append(key)
    return found
