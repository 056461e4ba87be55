"""What the Data tab shows about data settings: format, counts, a paged preview, one row exactly as the model
sees it (learned tokens marked), token lengths and the bad-row report.

Pure work on a file and a tokenizer: the page's server runs it in its own process, or for a shared studio in
a sandboxed child (``studio.sandbox``), where a file that unpacks to gigabytes or a slow chat template can
only take down the child.
"""

from __future__ import annotations

from pathlib import Path

from studio.config import DEMO_DATA, DataConfig, ModelConfig, from_dict
from studio.data import DEMO_EVAL, load_report
from studio.rendering import IGNORE, encode, token_preview

PREVIEW_PAGE = 10


def inspect(data: DataConfig, tokenizer, page: int = 0, max_bytes: int | None = None) -> dict:
    report = load_report(data, max_bytes=max_bytes)
    lengths, trained = [], 0
    for example in report.examples:
        ids, labels = encode(tokenizer, example, data.train_on)
        lengths.append(len(ids))
        trained += sum(1 for x in labels if x != IGNORE)
    over = sum(1 for n in lengths if n > data.max_length)
    pages = max(1, -(-report.usable // PREVIEW_PAGE))
    page = min(max(0, int(page)), pages - 1)
    rows = report.examples[page * PREVIEW_PAGE:(page + 1) * PREVIEW_PAGE]
    n_eval = 0 if data.eval_fraction == 0 or report.usable < 4 else max(1, round(report.usable * data.eval_fraction))
    if data.path in ("", DEMO_DATA):
        n_eval = sum(1 for line in DEMO_EVAL.open() if line.strip())
        split = f"{report.usable} training rows; {n_eval} held-out rows from heldout.jsonl"
    else:
        split = f"{report.usable - n_eval} training rows, {n_eval} held out ({data.eval_fraction:.0%})"
    sample = report.examples[page * PREVIEW_PAGE] if rows else report.examples[0]
    return {
        "file": Path(report.path).name, "format": report.format, "columns": report.columns,
        "summary": report.summary(), "split": split,
        "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
        "preview": [_conversation_row(i + page * PREVIEW_PAGE + 1, ex) for i, ex in enumerate(rows)],
        "page": page, "pages": pages, "lengths": lengths, "over_max_length": over,
        "max_length": data.max_length, "too_long": data.too_long, "trained_tokens": trained,
        "sample": [(text, "trained" if learned else "masked")
                   for text, learned in token_preview(tokenizer, sample, data.train_on)],
    }


def inspect_standalone(data: dict, model: dict, page: int = 0, max_bytes: int | None = None) -> dict:
    """inspect() from plain values, loading the tokenizer itself: what the sandboxed child runs."""
    from studio import models
    cfg = from_dict({"data": data, "model": model})
    return inspect(cfg.data, models.load_tokenizer(ModelConfig(**model)), page, max_bytes)


def _conversation_row(number: int, example: dict) -> dict:
    if "text" in example:
        return {"#": number, "conversation": example["text"][:500]}
    text = "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
    return {"#": number, "conversation": text[:800]}
