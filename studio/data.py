"""Read a data file, detect its format, and turn every row into one conversation form.

The one form is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, or
``{"text": str}`` for plain-text rows. Every row is checked; a bad row is kept out of training and
reported with its row number and a reason. A file with no usable row is an error raised here, before
any model is loaded.

This module knows nothing about tokenizers or models (see ``studio.rendering`` for that).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import DEMO_DATA, DataConfig
from studio.errors import StudioError
from studio.limits import Limits
from studio import preference_data
from studio.paths import ASSETS_DIR

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "feedback", "prompts")
# The stage that reads each kind of row that supervised fine-tuning cannot use (its message names them).
READ_BY = {"preference": "DPO, ORPO, SimPO or a reward model", "feedback": "KTO"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEMO_TRAIN = ASSETS_DIR / "demo" / "train.jsonl"
DEMO_EVAL = ASSETS_DIR / "demo" / "heldout.jsonl"
# Demo data sets by name (data.path): each a folder of assets/ with train.jsonl and heldout.jsonl.
DEMOS = {DEMO_DATA: "demo", "demo-dpo": "demo-dpo", "demo-grpo": "demo-grpo"}


def is_demo(path: str) -> bool:
    return path in ("", *DEMOS)


def demo_heldout(path: str) -> Path:
    return ASSETS_DIR / DEMOS[path or DEMO_DATA] / "heldout.jsonl"

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")
MAX_SHOWN_BAD_ROWS = 200


@dataclass
class BadRow:
    row: int  # 1-based, as a person counts lines or rows in a spreadsheet
    reason: str


@dataclass
class DataReport:
    path: str
    format: str
    columns: list[str]
    total_rows: int
    examples: list[dict] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    blank_rows: int = 0

    @property
    def usable(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        name = Path(self.path).name
        text = (f"{name}: {self.format} format, {self.usable} usable of {self.total_rows} rows"
                f" ({len(self.bad_rows)} bad, {self.blank_rows} blank).")
        return text

    def bad_rows_text(self, limit: int = 20) -> str:
        lines = [f"row {b.row}: {b.reason}" for b in self.bad_rows[:limit]]
        if len(self.bad_rows) > limit:
            lines.append(f"... and {len(self.bad_rows) - limit} more")
        return "\n".join(lines)


def resolve_data_path(path: str) -> Path:
    if is_demo(path):
        return ASSETS_DIR / DEMOS[path or DEMO_DATA] / "train.jsonl"
    return Path(path).expanduser()


def read_records(path: str | Path, max_bytes: int | None = None) -> tuple[list[Any], list[BadRow], int]:
    """Read raw records from a file or a saved datasets folder.

    Returns (records, unreadable rows, blank rows). A record is whatever one row holds (usually a dict).
    Problems with the whole file raise StudioError; a single unreadable JSONL line becomes a BadRow. Under a
    shared studio's limits (studio/limits.py) a file with too many rows or too much text is refused, and a
    row with too much text is one bad row.
    """
    limits = Limits.from_env()
    records, bad, blank = _read_records(Path(path), max_bytes, limits)
    if limits is not None:
        records, bad = _apply_limits(Path(path), records, bad, limits)
    return records, bad, blank


def _read_records(path: Path, max_bytes: int | None, limits: Limits | None) -> tuple[list[Any], list[BadRow], int]:
    if not path.exists():
        raise StudioError(f"Data file {path} does not exist. Check the path, or upload the file again.")
    if path.is_dir():
        return _read_saved_dataset(path), [], 0
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StudioError(
            f"{path.name}: files of type '{suffix or 'none'}' are not supported. Save your data as "
            f".jsonl, .json, .csv or .parquet.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise StudioError(
            f"{path.name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit. Use a smaller "
            "sample of your data.")
    if size == 0:
        raise StudioError(f"{path.name} is empty. Put at least one example in it.")
    if suffix == ".jsonl":
        return _read_jsonl(path, limits)
    if suffix == ".json":
        return _read_json(path), [], 0
    if suffix == ".csv":
        return _read_csv(path), [], 0
    if limits is not None:
        return _read_parquet_bounded(path, limits), [], 0
    return _read_parquet(path), [], 0


def _read_parquet_bounded(path: Path, limits: Limits) -> list[Any]:
    """Parquet compresses well (a few kilobytes can unpack to gigabytes): its metadata is checked first, then
    it is read a few rows at a time, and refused as soon as what was unpacked passes the limits."""
    import pyarrow.parquet as pq
    too_big = StudioError(f"{path.name} holds more than {limits.max_rows:,} rows or "
                          f"{limits.max_total_chars / 2**20:,.0f} MB of text once decompressed, the limits here. "
                          "Use a smaller sample of your data.")
    try:
        source = pq.ParquetFile(path)
        meta = source.metadata
        unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if meta.num_rows > limits.max_rows or unpacked > limits.max_total_chars:
            raise too_big
        records, total = [], 0
        for batch in source.iter_batches(batch_size=16):
            for row in batch.to_pylist():
                total += _text_size(row)
                if total > limits.max_total_chars:
                    raise too_big
                records.append((len(records) + 1, {k: _plain(v) for k, v in row.items()}))
    except StudioError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises several error types for damaged files
        raise StudioError(f"{path.name} could not be read as Parquet ({type(err).__name__}: {err}). The file "
                          "may be damaged or only partly copied; export it again.") from None
    return records


def _apply_limits(path: Path, records: list, bad: list[BadRow], limits: Limits) -> tuple[list, list[BadRow]]:
    """Too many rows or too much text: the file is refused; a row with too much text: that row is bad."""
    if len(records) > limits.max_rows:
        raise StudioError(f"{path.name} has {len(records):,} rows; the limit here is {limits.max_rows:,}. Use a "
                          "smaller sample of your data.")
    kept, total = [], 0
    for number, record in records:
        size = _text_size(record)
        total += size
        if total > limits.max_total_chars:
            raise StudioError(f"{path.name} holds more than {limits.max_total_chars / 2**20:,.0f} MB of text, the "
                              "limit here. Use a smaller sample of your data.")
        if size > limits.max_row_chars:
            bad.append(BadRow(number, f"row {number} has {size:,} characters of text; the limit here is "
                                      f"{limits.max_row_chars:,} a row"))
        else:
            kept.append((number, record))
    return kept, sorted(bad, key=lambda b: b.row)


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return len(str(value))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Spreadsheets on Windows often save Latin-1 (cp1252); it decodes any byte, so it goes last.
        return raw.decode("cp1252", errors="replace")


def _read_jsonl(path: Path, limits: Limits | None = None) -> tuple[list[Any], list[BadRow], int]:
    records, bad, blank = [], [], 0
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        if limits is not None and len(line) > limits.max_row_chars:
            bad.append(BadRow(number, f"line {number} has {len(line):,} characters; the limit here is "
                                      f"{limits.max_row_chars:,} a row"))
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            bad.append(BadRow(number, f"line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                                      "fix or delete that line"))
        except RecursionError:
            bad.append(BadRow(number, f"line {number} is nested too deeply to read; flatten that record"))
    return records, bad, blank


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise StudioError(f"{path.name} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
                          "If it has one record per line, rename it to .jsonl.") from None
    except RecursionError:
        raise StudioError(f"{path.name} is nested too deeply to read as one JSON document. Save it as .jsonl, one "
                          "record per line: then only the rows nested too deeply are skipped.") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} and similar wrappers
            data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise StudioError(f"{path.name} must hold a JSON list of records, like [{{\"instruction\": ..., "
                          "\"output\": ...}}, ...]; found something else at the top level.")
    return list(enumerate(data, start=1))


def _read_csv(path: Path) -> list[Any]:
    import io

    import pandas as pd
    try:
        frame = pd.read_csv(io.StringIO(_decode(path)), dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises several parser error types
        raise StudioError(f"{path.name} could not be read as CSV ({err}). Check that it has a header row "
                          "and consistent commas.") from None
    return _frame_records(frame)


def _read_parquet(path: Path) -> list[Any]:
    import pandas as pd
    try:
        frame = pd.read_parquet(path)
    except Exception as err:
        raise StudioError(f"{path.name} could not be read as Parquet ({type(err).__name__}: {err}). The file "
                          "may be damaged or only partly copied; export it again.") from None
    return _frame_records(frame)


def _read_saved_dataset(path: Path) -> list[Any]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise StudioError(f"{path} is not a folder saved with datasets' save_to_disk ({err}).") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return list(enumerate(ds.to_list(), start=1))


def _frame_records(frame) -> list[Any]:
    records = []
    for number, row in enumerate(frame.to_dict(orient="records"), start=1):
        records.append((number, {k: _plain(v) for k, v in row.items()}))
    return records


def _plain(value: Any) -> Any:
    """Turn numpy/pandas values into plain Python so the same checks apply to every file type."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def detect_format(keys: set[str], kind: str = "conversations") -> str | None:
    """The format the columns say, for a stage that reads `kind` of rows (stages.DATA_KINDS)."""
    found = preference_data.detect(keys)
    if kind == "preference_pairs":
        return "preference" if found == "preference" else None
    if kind == "feedback":
        return found  # KTO reads pairs too: each chosen reply a good one, each rejected one a bad one
    if kind == "prompts":
        prompt_keys = {"prompt", "question", "instruction", "messages", "conversations"}
        return "prompts" if keys & prompt_keys else None
    if found:
        return found
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


_EXPECTED = {
    "alpaca": "'instruction' and 'output' (optional 'input', 'system')",
    "sharegpt": "'conversations' (a list of {from, value})",
    "messages": "'messages' (a list of {role, content})",
    "prompt_completion": "'prompt' and 'completion'",
    "text": "'text'",
    **preference_data.EXPECTED,
}
KIND_OF_FORMAT = {**{f: "conversations" for f in ("alpaca", "sharegpt", "messages", "prompt_completion", "text")},
                  "preference": "preference_pairs", "feedback": "feedback", "prompts": "prompts"}


def load_report(cfg: DataConfig, path: str | Path | None = None, max_bytes: int | None = None,
                kind: str = "conversations") -> DataReport:
    """Read, detect, normalise and validate one file for a stage that reads `kind` of rows. Raises StudioError
    when nothing is usable, or when the rows are of a kind this stage does not read (naming the one that does)."""
    file_path = resolve_data_path(cfg.path) if path is None else Path(path)
    records, bad, blank = read_records(file_path, max_bytes=max_bytes)
    name = file_path.name
    renamed = [(n, _rename(r, cfg.columns)) for n, r in records]
    keys: set[str] = set()
    for _, rec in renamed:
        if isinstance(rec, dict):
            keys.update(rec)
    columns = sorted(keys)
    fmt = cfg.format if cfg.format != "auto" else detect_format(keys, kind)
    if not renamed and not bad:
        raise StudioError(f"{name} has no rows (only blank lines). Put at least one example in it.")
    if fmt is None:
        expected = [v for f, v in _EXPECTED.items() if KIND_OF_FORMAT[f] == kind or kind == "feedback"
                    and f == "preference"]
        raise StudioError(
            f"{name}: could not tell the format from the columns found ({', '.join(columns) or 'none'}). "
            f"Expected one of: {'; '.join(expected)}. Rename your columns, or map them in "
            "data.columns (e.g. question: instruction, answer: output).")
    if fmt not in FORMATS:
        raise StudioError(f"data.format {fmt!r} is unknown; use one of {', '.join(FORMATS)} or 'auto'.")
    if kind == "conversations" and fmt in READ_BY:
        what = "preference pairs (chosen and rejected replies)" if fmt == "preference" else \
            "feedback (replies labelled good or bad)"
        raise StudioError(f"{name} holds {what}, which supervised fine-tuning does not train on (it would learn "
                          f"the bad replies too). Train it with the {READ_BY[fmt]} stage: pick it under "
                          "'What to train' on the Train tab, or set stage in the config.")
    report = DataReport(path=str(file_path), format=fmt, columns=columns, total_rows=len(records) + len(bad),
                        bad_rows=list(bad), blank_rows=blank)
    for number, rec in renamed:
        if _is_blank(rec):
            report.blank_rows += 1
            report.total_rows -= 1
            continue
        try:
            example = normalise(rec, fmt, cfg.system_prompt)
        except ValueError as err:
            report.bad_rows.append(BadRow(number, str(err)))
            continue
        if kind == "feedback" and fmt == "preference":  # a pair is a good reply and a bad one
            report.examples += [{"prompt": example["prompt"], "completion": example[side], "label": side == "chosen"}
                                for side in ("chosen", "rejected")]
        else:
            report.examples.append(example)
    report.bad_rows.sort(key=lambda b: b.row)
    if not report.examples:
        detail = report.bad_rows_text(5)
        raise StudioError(
            f"{name} has no usable rows in {fmt} format ({report.total_rows} rows, {len(report.bad_rows)} bad, "
            f"{report.blank_rows} blank). Expected columns {_EXPECTED[fmt]}." + (f"\nFirst problems:\n{detail}"
                                                                                if detail else ""))
    return report


def _rename(rec: Any, mapping: dict) -> Any:
    if not mapping or not isinstance(rec, dict):
        return rec
    return {mapping.get(k, k): v for k, v in rec.items()}


def _is_blank(rec: Any) -> bool:
    if rec is None:
        return True
    if isinstance(rec, dict):
        return all(v is None or (isinstance(v, str) and not v.strip()) or v == [] for v in rec.values())
    return False


def _text(value: Any, what: str, required: bool = True) -> str:
    if value is None:
        value = ""
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"{what} holds a {type(value).__name__}, expected text")
    if isinstance(value, (int, float)):
        value = str(value)  # a numeric answer such as 42 is legitimate text for a chat model
    if not isinstance(value, str):
        raise ValueError(f"{what} holds a {type(value).__name__}, expected text")
    if required and not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def normalise(rec: Any, fmt: str, system_prompt: str = "") -> dict:
    """One raw record -> {"messages": [...]} or {"text": ...} (or a preference_data form); raises ValueError
    with the reason."""
    if fmt in preference_data.KINDS:
        return preference_data.normalise(rec, fmt, system_prompt, _text, _turns)
    if not isinstance(rec, dict):
        raise ValueError(f"row is a {type(rec).__name__}, expected an object with named fields")
    if fmt == "text":
        return {"text": _text(rec.get("text"), "'text'")}
    if fmt == "alpaca":
        instruction = _text(rec.get("instruction"), "'instruction'")
        extra = _text(rec.get("input"), "'input'", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = []
        system = _text(rec.get("system"), "'system'", required=False)
        if system.strip():
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _text(rec.get("output"), "'output'")}]
    elif fmt == "prompt_completion":
        prompt, completion = rec.get("prompt"), rec.get("completion")
        messages = (_turns(prompt, "role", "content", "'prompt'") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(prompt, "'prompt'")}])
        messages += (_turns(completion, "role", "content", "'completion'") if isinstance(completion, list)
                     else [{"role": "assistant", "content": _text(completion, "'completion'")}])
    elif fmt == "sharegpt":
        messages = _turns(rec.get("conversations"), "from", "value", "'conversations'", SHAREGPT_ROLES)
    elif fmt == "messages":
        messages = _turns(rec.get("messages"), "role", "content", "'messages'")
    else:
        raise ValueError(f"unknown format {fmt}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_conversation(messages)
    return {"messages": messages}


def _turns(value: Any, role_key: str, content_key: str, what: str, role_map: dict | None = None) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold lists as JSON text
        except json.JSONDecodeError:
            raise ValueError(f"{what} is text, expected a list of turns") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} is {'empty' if value in (None, [], '') else 'not a list of turns'}")
    turns = []
    for i, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object with '{role_key}' and '{content_key}'")
        raw_role = str(turn.get(role_key, "")).strip()
        role = (role_map or {r: r for r in _ROLES}).get(raw_role.lower())
        if role is None:
            raise ValueError(f"turn {i} has unknown role '{raw_role}'; use system, user or assistant")
        turns.append({"role": role, "content": _text(turn.get(content_key), f"turn {i} ({role})")})
    return turns


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
        if body[j]["role"] == body[j - 1]["role"]:
            who = body[j]["role"]
            raise ValueError(f"two {who} turns in a row (turns {j + offset} and {j + offset + 1}); merge them "
                             "or put the other speaker's turn between")
    if body[-1]["role"] != "assistant":
        raise ValueError("ends on a user turn; the last turn must be the assistant's reply to learn from")


@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]
    train_report: DataReport
    eval_report: DataReport | None


def load_splits(cfg: DataConfig, seed: int, max_bytes: int | None = None, kind: str = "conversations") -> Splits:
    """Training and held-out examples, from a second file or a seeded random split of the first."""
    report = load_report(cfg, max_bytes=max_bytes, kind=kind)
    examples = list(report.examples)
    eval_report = None
    eval_path = cfg.eval_path or (str(demo_heldout(cfg.path)) if is_demo(cfg.path) else "")
    if eval_path:
        eval_report = load_report(cfg, path=Path(eval_path), max_bytes=max_bytes, kind=kind)
        return Splits(examples, eval_report.examples, report, eval_report)
    n_eval = int(round(len(examples) * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and len(examples) >= 4:
        n_eval = max(1, min(n_eval, len(examples) - 1))
    else:
        n_eval = 0
    random.Random(seed).shuffle(examples)
    return Splits(examples[n_eval:], examples[:n_eval], report, None)
