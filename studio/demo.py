"""The demos' yardsticks: on held-out prompts, how often does a model do what its demo taught?

- The SFT demo (pirate talk): replies that open with "Ahoy" and close with "Arr".
- The DPO demo (and the other preference stages on its data): replies that open with "Certainly!".
- The GRPO demo: the mean of the run's own rewards over greedy replies.

The bundled base model does none of these, so the counts base against tuned are a plain, visible measure of
what fine-tuning changed. Results are saved in the run folder as demo_eval.json.
"""

from __future__ import annotations

import json
import re

from studio.data import demo_heldout, is_demo
from studio.inference import ChatModelCache, reply
from studio.runs import open_run

_OPENING = re.compile(r"^\W*ahoy\b", re.IGNORECASE)
_CLOSING = re.compile(r"\barr+\b", re.IGNORECASE)
_CERTAINLY = re.compile(r"^\W*certainly\b", re.IGNORECASE)


def answers_taught_way(text: str) -> bool:
    return bool(_OPENING.search(text.strip()) and _CLOSING.search(text))


def opens_with_certainly(text: str) -> bool:
    return bool(_CERTAINLY.search(text.strip()))


def heldout_prompts(data_path: str = "demo") -> list[str]:
    rows = [json.loads(line) for line in demo_heldout(data_path).read_text(encoding="utf-8").splitlines() if line]
    return [row["prompt"] if "prompt" in row else next(m["content"] for m in row["messages"] if m["role"] == "user")
            for row in rows]


def evaluate(run_ref: str, max_new_tokens: int = 48, limit: int | None = None) -> dict:
    """Greedy replies from base and tuned model on every held-out prompt of the run's demo data."""
    run = open_run(run_ref)
    cfg = run.config()
    stage = run.stored_status().stage
    data_path = cfg.data.path if is_demo(cfg.data.path) else "demo"
    if stage == "grpo":
        measure, what = _grpo_measure(cfg), "mean reward"
        max_new_tokens = cfg.settings_of("grpo").max_completion_length
    elif stage in ("dpo", "orpo", "simpo", "kto"):
        measure, what = (lambda prompt, text: float(opens_with_certainly(text))), "opens with 'Certainly!'"
    else:
        measure, what = (lambda prompt, text: float(answers_taught_way(text))), "answered the taught way"
    cache = ChatModelCache(size=2)
    base, tuned = cache.get("base", run.id), cache.get("adapter", run.id)
    rows = []
    for prompt in heldout_prompts(data_path)[:limit]:
        b, t = reply(base, prompt, max_new_tokens=max_new_tokens), reply(tuned, prompt, max_new_tokens=max_new_tokens)
        rows.append({"prompt": prompt, "base": b, "tuned": t, "base_score": measure(prompt, b),
                     "tuned_score": measure(prompt, t)})
    result = {"prompts": len(rows), "measure": what, "stage": stage,
              "base_total": round(sum(r["base_score"] for r in rows), 3),
              "tuned_total": round(sum(r["tuned_score"] for r in rows), 3), "rows": rows}
    if stage not in ("grpo",):  # counts of prompts answered that way (the SFT demo's numbers as before)
        result["base_taught_way"], result["tuned_taught_way"] = int(result["base_total"]), int(result["tuned_total"])
    run.write_json("demo_eval.json", result)
    return result


def _grpo_measure(cfg):
    """The run's own rewards, weighted as in training, on one prompt and reply at a time."""
    from studio import rewards
    chosen = rewards.build(cfg.settings_of("grpo"), shared=False)

    def measure(prompt: str, text: str) -> float:
        completions = [[{"role": "assistant", "content": text}]]
        prompts = [[{"role": "user", "content": prompt}]]
        return sum(r.weight * r.function(prompts=prompts, completions=completions, answer=[""])[0] for r in chosen)
    return measure
