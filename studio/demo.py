"""The demo's yardstick: on held-out prompts, how often does a model answer the taught way?

The demo data teaches replies that open with "Ahoy" and close with "Arr". The bundled base model
never talks like that, so the share of held-out replies that do is a plain, visible measure of
what fine-tuning changed.
"""

from __future__ import annotations

import json
import re

from studio.data import DEMO_EVAL
from studio.inference import ChatModelCache, reply
from studio.runs import open_run

_OPENING = re.compile(r"^\W*ahoy\b", re.IGNORECASE)
_CLOSING = re.compile(r"\barr+\b", re.IGNORECASE)


def answers_taught_way(text: str) -> bool:
    return bool(_OPENING.search(text.strip()) and _CLOSING.search(text))


def heldout_prompts() -> list[str]:
    rows = [json.loads(line) for line in DEMO_EVAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]


def evaluate(run_ref: str, max_new_tokens: int = 48, limit: int | None = None) -> dict:
    """Greedy replies from base and tuned model on every held-out prompt; saved as demo_eval.json."""
    run = open_run(run_ref)
    cache = ChatModelCache(size=2)
    base, tuned = cache.get("base", run.id), cache.get("adapter", run.id)
    rows = []
    for prompt in heldout_prompts()[:limit]:
        b, t = reply(base, prompt, max_new_tokens=max_new_tokens), reply(tuned, prompt, max_new_tokens=max_new_tokens)
        rows.append({"prompt": prompt, "base": b, "tuned": t, "base_ok": answers_taught_way(b),
                     "tuned_ok": answers_taught_way(t)})
    result = {"prompts": len(rows), "base_taught_way": sum(r["base_ok"] for r in rows),
              "tuned_taught_way": sum(r["tuned_ok"] for r in rows), "rows": rows}
    run.write_json("demo_eval.json", result)
    return result
