"""What the Data tab shows about data settings: format, counts, a paged preview, one row exactly as the model
sees it (learned tokens marked), token lengths, the bad-row report grouped by reason, columns mapped and unused,
placeholders found, duplicates, and a row that calls tools.

Only one page of rows goes back to the page; token lengths of a large file are measured on an even sample of
LENGTH_SAMPLE rows (and said to be an estimate), so a 52,000-row file is checked in seconds.

Pure work on a file and a tokenizer: the page's server runs it in its own process, or for a shared studio in
a sandboxed child (``studio.sandbox``), where a file that unpacks to gigabytes or a slow chat template can
only take down the child.
"""

from __future__ import annotations

from pathlib import Path

from studio import dedup
from studio.config import DataConfig, ModelConfig, from_dict
from studio.data import demo_heldout, is_demo, load_report
from studio.rendering import IGNORE, encode, token_preview

PREVIEW_PAGE = 10
LENGTH_SAMPLE = 2000


def inspect(data: DataConfig, tokenizer, page: int = 0, max_bytes: int | None = None,
            kind: str = "conversations") -> dict:
    """`kind`: the rows the chosen stage reads (stages.DATA_KINDS). Preference pairs show the chosen and the
    rejected reply each rendered after the prompt; feedback its reply and label; prompts the prompt as the model
    gets it to reply to, with the reference answer."""
    report = load_report(data, max_bytes=max_bytes, kind=kind)
    lengths, trained = [], 0
    step = max(1, report.usable / LENGTH_SAMPLE)
    measured = [report.examples[int(i * step)] for i in range(min(report.usable, LENGTH_SAMPLE))]
    for example in measured:
        ids, labels = encode(tokenizer, _as_conversation(example), data.train_on)
        lengths.append(len(ids))
        trained += sum(1 for x in labels if x != IGNORE)
    scale = report.usable / max(1, len(measured))
    over = round(sum(1 for n in lengths if n > data.max_length) * scale)
    trained = round(trained * scale)
    found = dedup.find(report.examples, near=data.dedup == "near") if data.dedup != "off" else None
    pages = max(1, -(-report.usable // PREVIEW_PAGE))
    page = min(max(0, int(page)), pages - 1)
    rows = report.examples[page * PREVIEW_PAGE:(page + 1) * PREVIEW_PAGE]
    n_eval = 0 if data.eval_fraction == 0 or report.usable < 4 else max(1, round(report.usable * data.eval_fraction))
    if is_demo(data.path):
        n_eval = sum(1 for line in demo_heldout(data.path).open() if line.strip())
        split = f"{report.usable} training rows; {n_eval} held-out rows from heldout.jsonl"
    else:
        split = f"{report.usable - n_eval} training rows, {n_eval} held out ({data.eval_fraction:.0%})"
    sample = report.examples[page * PREVIEW_PAGE] if rows else report.examples[0]
    rejected = None
    if "rejected" in sample:
        rejected = _marked(token_preview(tokenizer, _as_conversation(sample, "rejected"), data.train_on))
    return {
        "file": Path(report.path).name, "format": report.format, "columns": report.columns,
        "summary": report.summary(), "split": split,
        "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
        "preview": [_conversation_row(i + page * PREVIEW_PAGE + 1, ex) for i, ex in enumerate(rows)],
        "page": page, "pages": pages, "lengths": lengths, "over_max_length": over,
        "max_length": data.max_length, "too_long": data.too_long, "trained_tokens": trained,
        "sample": _marked(token_preview(tokenizer, _as_conversation(sample), data.train_on)),
        "sample_rejected": rejected, "kind": kind, "estimated": len(measured) < report.usable,
        "details": report.details(), "tool_sample": _tool_sample(tokenizer, report.examples, data.train_on),
        "duplicates": {"exact": found.exact, "near": found.near, "groups": found.listed(report.examples)}
        if found else {},
    }


def _tool_sample(tokenizer, examples: list[dict], train_on: str):
    """The first row that calls tools, as the model sees it (None when no row does)."""
    for example in examples[:5000]:
        if any(m.get("tool_calls") for m in example.get("messages", ())):
            return _marked(token_preview(tokenizer, example, train_on))
    return None


def _marked(pieces) -> list[tuple[str, str]]:
    return [(text, "trained" if learned else "masked") for text, learned in pieces]


def _as_conversation(example: dict, side: str = "chosen") -> dict:
    """A row of any kind as the conversation the model is trained or scored on: the prompt and the reply
    (for a pair, its chosen or rejected one; for a prompt, the reference answer, or nothing)."""
    if "messages" in example or "text" in example:
        return example
    reply = example.get(side) or example.get("completion") or example.get("answer") or ""
    return {"messages": [*example["prompt"], *([{"role": "assistant", "content": reply}] if reply else [])]}


def inspect_standalone(data: dict, model: dict, page: int = 0, max_bytes: int | None = None,
                       kind: str = "conversations") -> dict:
    """inspect() from plain values, loading the tokenizer itself: what the sandboxed child runs."""
    from studio import models
    cfg = from_dict({"data": data, "model": model})
    return inspect(cfg.data, models.load_tokenizer(ModelConfig(**model)), page, max_bytes, kind)


def _conversation_row(number: int, example: dict) -> dict:
    if "text" in example:
        return {"#": number, "conversation": example["text"][:500]}
    if "messages" in example:
        return {"#": number, "conversation": _turns(example["messages"])[:800]}
    row = {"#": number, "prompt": _turns(example["prompt"])[:500]}
    for key in ("chosen", "rejected", "completion", "label", "answer"):
        if key in example:
            row[key] = example[key] if isinstance(example[key], bool) else str(example[key])[:400]
    return row


def _turns(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" + (f" [calls {', '.join(c['function']['name'] for c in m['tool_calls'])}]"
                                                       if m.get("tool_calls") else "")
                     for m in messages if m["role"] != "system" or m["content"])
