"""The forgetting check: does the tuned model still answer easy general questions the base model got right?

Fine-tuning on a narrow data set can wear away what a model already knew. The probe is a fixed set of short
questions with checkable answers (assets/probe/general.jsonl: capitals, sums, plurals, "reply with only yes", ...),
asked of the base and the tuned model alike; ``verdict`` compares the two and says in plain words whether the
tuned model has forgotten something.

This module knows the questions and how to mark a reply (through studio.metrics). It does not know how replies are
generated: ``answer_probe`` takes a ``generate(prompts) -> replies`` callable, so the engine chooses the model,
greedy decoding, batching and the token budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError
from studio.metrics import compile_pattern, score
from studio.paths import ASSETS_DIR

DEFAULT_PROBE = ASSETS_DIR / "probe" / "general.jsonl"
CHECKS = ("contains", "exact", "numeric", "regex")

# With greedy decoding each reply is deterministic, so the only "noise" between base and tuned is training nudging
# a few borderline questions one way or the other. One or two such flips must never raise the alarm, even on a
# small probe where two questions are over 10% (2 of 15 = 13%): the net loss has to be more than this many
# questions as well as more than the threshold. On the full 87-question probe the threshold (9 questions) is the
# stricter of the two; this floor only matters for small probes or subsets.
WOBBLE_QUESTIONS = 2

_ADVICE = ("Try fewer epochs, a lower learning rate, or mixing some general conversations into your data.")


@dataclass(frozen=True)
class ProbeItem:
    id: str
    prompt: str
    answer: str
    check: str
    topic: str
    pattern: str = ""


@dataclass
class Verdict:
    total: int
    base_right: int
    tuned_right: int
    base_rate: float
    tuned_rate: float
    drop: float  # base_rate - tuned_rate: positive when the tuned model does worse
    flagged: bool
    forgotten: list[int] = field(default_factory=list)  # positions of questions the base got right, tuned wrong
    message: str = ""


def load_probe(path: str | Path | None = None) -> list[ProbeItem]:
    """The probe's questions, from `path` (a .jsonl file, one question per line) or the bundled general probe."""
    path = Path(path) if path else DEFAULT_PROBE
    if not path.is_file():
        raise StudioError(f"Probe file {path} not found. Give a .jsonl file with one question per line, or leave "
                          "the path empty to use the bundled general probe.")
    items = [_parse_line(line, number, path)
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not items:
        raise StudioError(f"Probe file {path} holds no questions.")
    _check_unique_ids(items, path)
    return items


def _parse_line(line: str, number: int, path: Path) -> ProbeItem:
    where = f"{path.name} line {number}"
    try:
        row = json.loads(line)
    except ValueError as err:
        raise StudioError(f"{where} is not valid JSON ({err}). Each line must be one JSON object.") from None
    if not isinstance(row, dict):
        raise StudioError(f"{where} must be a JSON object with id, prompt, answer, check and topic.")
    missing = [key for key in ("id", "prompt", "answer", "check") if not str(row.get(key) or "").strip()]
    if missing:
        raise StudioError(f"{where} has no {', '.join(missing)}: every question needs id, prompt, answer and check.")
    item = ProbeItem(id=str(row["id"]), prompt=str(row["prompt"]), answer=str(row["answer"]), check=str(row["check"]),
                     topic=str(row.get("topic") or "general"), pattern=str(row.get("pattern") or ""))
    _check_item(item, where)
    return item


def _check_item(item: ProbeItem, where: str) -> None:
    if item.check not in CHECKS:
        raise StudioError(f"{where}: check {item.check!r} is not one of {', '.join(CHECKS)}.")
    if item.check == "regex":
        if not item.pattern:
            raise StudioError(f"{where}: a 'regex' check needs a 'pattern'.")
        compile_pattern(item.pattern)  # a bad pattern is reported now, naming it, not halfway through a run
    if score(item.check, item.answer, item.answer, item.pattern) != 1.0:
        raise StudioError(f"{where}: its own answer {item.answer!r} fails its {item.check} check; fix the answer "
                          "or the pattern.")


def _check_unique_ids(items: list[ProbeItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise StudioError(f"{path.name}: the id {item.id!r} is used twice; give every question its own id.")
        seen.add(item.id)


def passes(item: ProbeItem, reply: str) -> bool:
    """Whether `reply` answers `item` right, by the item's own check."""
    return score(item.check, reply, item.answer, item.pattern) == 1.0


def answer_probe(generate: Callable[[list[str]], list[str]], items: Sequence[ProbeItem]) -> list[str]:
    """The replies of `generate` to every question, in order. `generate` gets all prompts at once and decides
    how to produce replies (greedy, batched, with the token budget it likes)."""
    prompts = [item.prompt for item in items]
    replies = list(generate(prompts))
    if len(replies) != len(prompts):
        raise ValueError(f"generate returned {len(replies)} replies for {len(prompts)} prompts")
    return ["" if reply is None else str(reply) for reply in replies]


def verdict(base_passed: list[bool], tuned_passed: list[bool], threshold: float = 0.1,
            items: Sequence[ProbeItem] | None = None) -> Verdict:
    """Compare which questions the base and the tuned model got right (same questions, same order). `items`,
    when given, lets the message quote a forgotten question."""
    if len(base_passed) != len(tuned_passed):
        raise StudioError(f"The base model was marked on {len(base_passed)} questions and the tuned one on "
                          f"{len(tuned_passed)}; both must answer the same probe.")
    total = len(base_passed)
    if total == 0:
        raise StudioError("The probe has no questions, so there is nothing to compare.")
    base_right, tuned_right = sum(map(bool, base_passed)), sum(map(bool, tuned_passed))
    drop = (base_right - tuned_right) / total
    flagged = drop > threshold and base_right - tuned_right > WOBBLE_QUESTIONS
    forgotten = [i for i, (b, t) in enumerate(zip(base_passed, tuned_passed)) if b and not t]
    result = Verdict(total=total, base_right=base_right, tuned_right=tuned_right, base_rate=base_right / total,
                     tuned_rate=tuned_right / total, drop=drop, flagged=flagged, forgotten=forgotten)
    result.message = _message(result, items)
    return result


def _message(result: Verdict, items: Sequence[ProbeItem] | None) -> str:
    questions = "general question" if result.total == 1 else "general questions"
    counts = (f"The tuned model answers {result.tuned_right} of {result.total} {questions} right; "
              f"the base answered {result.base_right}.")
    if result.flagged:
        example = _example(result, items)
        return f"{counts} It has forgotten some of what it knew{example}. {_ADVICE}"
    if result.tuned_right >= result.base_right:
        return f"{counts} It has kept what it knew."
    return f"{counts} That small difference is normal variation: it has kept what it knew."


def _example(result: Verdict, items: Sequence[ProbeItem] | None) -> str:
    if not items or not result.forgotten or len(items) != result.total:
        return ""
    item = items[result.forgotten[0]]
    return f', e.g. "{item.prompt}" (answer: {item.answer})'
