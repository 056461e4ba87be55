"""Other data mixed into the training rows: extra files at a share each (data.mix) and self-replay
(data.replay_share, studio.replay). Only the training split gets them: the held-out rows stay the person's own,
so the held-out loss keeps measuring their task.

A share is of the final training set: with 800 rows of one's own and {general.jsonl: 0.2}, 200 general rows are
added (800 / (1 - 0.2) x 0.2). A file with fewer rows than its share asks for gives all it has, and says so.
"""

from __future__ import annotations

import dataclasses
import random

from studio.config import DataConfig, ModelConfig
from studio.errors import StudioError


def mix(cfg: DataConfig, train: list[dict], seed: int, model: ModelConfig | None = None,
        max_bytes: int | None = None, generate=None) -> tuple[list[dict], list[dict]]:
    """(training rows with the mixed-in rows added and shuffled in, [{source, rows, asked}] per source)."""
    try:
        sources = {str(k): float(v) for k, v in (cfg.mix or {}).items()}
    except (TypeError, ValueError):
        raise StudioError(f"data.mix {cfg.mix} needs a share (a number such as 0.2) for each file.") from None
    if cfg.replay_share:
        sources["self-replay"] = float(cfg.replay_share)
    if not sources:
        return train, []
    total = sum(sources.values())
    if any(s <= 0 for s in sources.values()) or total >= 1:
        raise StudioError(f"data.mix and data.replay_share give shares {sources}: each must be above 0 and together "
                          "below 1 (the rest is your own data).")
    rng = random.Random(seed)
    own = len(train)
    mixed, info = list(train), []
    for source, share in sources.items():
        asked = round(own / (1 - total) * share)
        rows = _rows_of(source, cfg, model, max_bytes, generate)
        rng.shuffle(rows)
        taken = rows[:asked]
        mixed += taken
        info.append({"source": source, "rows": len(taken), "asked": asked, "share": share})
    rng.shuffle(mixed)
    return mixed, info


def _rows_of(source: str, cfg: DataConfig, model: ModelConfig | None, max_bytes, generate) -> list[dict]:
    if source == "self-replay":
        from studio import replay
        if model is None:
            raise StudioError("Self-replay needs the model to answer its general prompts; it runs inside training.")
        return replay.examples(model, generate)
    from studio.data import load_report
    # The other file is read on its own terms: its columns are detected afresh (the mapping is for your file).
    other = dataclasses.replace(cfg, path=source, columns={}, mix={}, replay_share=0.0, eval_path="")
    return list(load_report(other, max_bytes=max_bytes).examples)
