"""Read a data file, detect its format, and turn every row into one conversation form.

The one form is ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...]}``
(optionally with ``"tools"``; see ``studio.data_shapes`` for tool calls, reasoning and per-turn weights), or
``{"text": str}`` for plain-text rows (``.txt``/``.md`` files and ``text`` columns). Every row is checked; a bad
row is kept out of training and reported with its row number and a reason, and the reasons are grouped for the
summary. Columns present but not read are named; the ones that usually matter (system, tools, images...) are
warnings. A file with no usable row is an error raised here, before any model is loaded.

This module knows nothing about tokenizers or models (see ``studio.rendering`` for that).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import column_aliases, data_shapes, nested_formats, placeholders, preference_data
from studio.config import DEMO_DATA, DataConfig
from studio.errors import StudioError
from studio.limits import Limits
from studio.paths import ASSETS_DIR

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "feedback", "prompts",
           "oasst", "seed_tasks")
# The stage that reads each kind of row that supervised fine-tuning cannot use (its message names them).
READ_BY = {"preference": "DPO, ORPO, SimPO or a reward model", "feedback": "KTO"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")
TEXT_SUFFIXES = (".txt", ".md")
DEMO_TRAIN = ASSETS_DIR / "demo" / "train.jsonl"
DEMO_EVAL = ASSETS_DIR / "demo" / "heldout.jsonl"
# Demo data sets by name (data.path): each a folder of assets/ with train.jsonl and heldout.jsonl.
DEMOS = {DEMO_DATA: "demo", "demo-dpo": "demo-dpo", "demo-grpo": "demo-grpo"}


def is_demo(path: str) -> bool:
    return path in ("", *DEMOS)


def demo_heldout(path: str) -> Path:
    return ASSETS_DIR / DEMOS[path or DEMO_DATA] / "heldout.jsonl"

SHAREGPT_ROLES = data_shapes.SHAREGPT_ROLES
MAX_SHOWN_BAD_ROWS = 200
# Columns each format reads (after renames); any other column is named as unused.
READS = {"alpaca": {"instruction", "input", "output", "system", "history", "tools"},
         "sharegpt": {"conversations", "system", "tools"}, "messages": {"messages", "system", "tools"},
         "prompt_completion": {"prompt", "completion", "system", "tools"}, "text": {"text"},
         "oasst": {"text", "role", "replies", "prompt", "message_id", "parent_id"},
         "seed_tasks": {"instruction", "instances"}}
# Unused columns that usually carry something the person meant to train on: a warning, not a note.
MATTERS = {"system": "a system message per row", "tools": "the tools a row may call",
           "images": "images (this model reads text only)", "videos": "videos (this model reads text only)",
           "audios": "audio (this model reads text only)", "label": "a good/bad label (the KTO stage reads it)",
           "chosen": "preferred replies (the DPO stage reads them)",
           "rejected": "rejected replies (the DPO stage reads them)", "history": "earlier turns"}


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
    mapping: dict = field(default_factory=dict)  # columns renamed automatically (case, aliases): shown, editable
    unused_columns: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placeholders: dict = field(default_factory=dict)  # name -> rows it appears in
    tool_rows: int = 0  # rows that call tools or offer them

    @property
    def usable(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        name = Path(self.path).name
        text = (f"{name}: {self.format} format, {self.usable} usable of {self.total_rows} rows"
                f" ({len(self.bad_rows)} bad, {self.blank_rows} blank).")
        return text

    def skipped_by_reason(self) -> list[dict]:
        """The bad rows grouped by what is wrong (row numbers taken out of the reason), largest group first."""
        groups: dict[str, list[int]] = {}
        for b in self.bad_rows:
            groups.setdefault(_reason_kind(b.reason), []).append(b.row)
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        return [{"reason": reason, "rows": len(rows), "first_rows": rows[:5]} for reason, rows in ordered]

    def details(self) -> dict:
        """What was read, for data.json, the terminal and the pages (rows skipped grouped by reason)."""
        return {"format": self.format, "rows": self.total_rows, "usable": self.usable,
                "blank_rows": self.blank_rows, "skipped": self.skipped_by_reason(), "mapping": self.mapping,
                "unused_columns": self.unused_columns, "warnings": self.warnings,
                "placeholders": self.placeholders, "tool_rows": self.tool_rows}

    def bad_rows_text(self, limit: int = 20) -> str:
        lines = [f"row {b.row}: {b.reason}" for b in self.bad_rows[:limit]]
        if len(self.bad_rows) > limit:
            lines.append(f"... and {len(self.bad_rows) - limit} more")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """'line 12 is not valid JSON (... column 4)' -> 'line N is not valid JSON (... column N)'."""
    return re.sub(r"\d+", "N", reason)


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
        from studio import hub_data
        if hub_data.is_hub_id(str(path)):
            return hub_data.read(str(path)), [], 0
        raise StudioError(f"Data file {path} does not exist. Check the path, or upload the file again.")
    if path.is_dir():
        return _read_saved_dataset(path), [], 0
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StudioError(
            f"{path.name}: files of type '{suffix or 'none'}' are not supported. Save your data as "
            f".jsonl, .json, .csv or .parquet (or .txt / .md for plain text).")
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
    if suffix in TEXT_SUFFIXES:
        return read_plain_text(_decode(path)), [], 0
    if suffix == ".csv":
        return _read_csv(path), [], 0
    if limits is not None:
        return _read_parquet_bounded(path, limits), [], 0
    return _read_parquet(path), [], 0


def read_plain_text(text: str) -> list[Any]:
    """A .txt or .md file -> {"text": ...} rows, one per paragraph (text between blank lines), or one per line
    when the file has no blank lines (one document a line, as wiki dumps are). No text is dropped: a long
    paragraph is split into max_length blocks when it is tokenised (studio.rendering)."""
    text = text.replace("\r\n", "\n")
    pieces = re.split(r"\n[ \t]*\n", text) if re.search(r"\n[ \t]*\n", text) else text.split("\n")
    return [(n, {"text": piece.strip("\n")}) for n, piece in enumerate(pieces, start=1) if piece.strip()]


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
    if not records and not bad:
        raise StudioError(f"{name} has no rows (only blank lines). Put at least one example in it.")
    if nested_formats.is_flat_messages(records):
        records = nested_formats.assemble_flat(records)  # Open-Assistant's one-message-a-row export, as trees
    renamed, mapping = _renamed(records, cfg.columns, kind)
    keys: set[str] = set()
    for _, rec in renamed:
        if isinstance(rec, dict):
            keys.update(rec)
    columns = sorted(keys)
    fmt = cfg.format if cfg.format != "auto" else _detect(renamed, keys, kind)
    if fmt is None:
        raise StudioError(_unknown_format_message(name, columns, renamed, kind))
    if fmt not in FORMATS:
        raise StudioError(f"data.format {fmt!r} is unknown; use one of {', '.join(FORMATS)} or 'auto'.")
    if kind == "conversations" and fmt in READ_BY:
        what = "preference pairs (chosen and rejected replies)" if fmt == "preference" else \
            "feedback (replies labelled good or bad)"
        raise StudioError(f"{name} holds {what}, which supervised fine-tuning does not train on (it would learn "
                          f"the bad replies too). Train it with the {READ_BY[fmt]} stage: pick it under "
                          "'What to train' on the Train tab, or set stage in the config.")
    report = DataReport(path=str(file_path), format=fmt, columns=columns, total_rows=len(records) + len(bad),
                        bad_rows=list(bad), blank_rows=blank, mapping=mapping)
    _note_unused(report, keys, fmt, renamed)
    for number, rec in renamed:
        if _is_blank(rec):
            report.blank_rows += 1
            report.total_rows -= 1
            continue
        try:
            examples = _examples_of(rec, fmt, cfg, kind)
        except ValueError as err:
            report.bad_rows.append(BadRow(number, str(err)))
            continue
        for example in examples:
            _count_extras(report, example, number)
        report.examples += examples
    _skip_unfilled_placeholders(report, cfg)
    report.bad_rows.sort(key=lambda b: b.row)
    if not report.examples:
        detail = report.bad_rows_text(5)
        expected = _EXPECTED.get(fmt, fmt)
        raise StudioError(
            f"{name} has no usable rows in {fmt} format ({report.total_rows} rows, {len(report.bad_rows)} bad, "
            f"{report.blank_rows} blank). Expected columns {expected}." + (f"\nFirst problems:\n{detail}"
                                                                           if detail else ""))
    return report


def _renamed(records: list, explicit: dict, kind: str) -> tuple[list, dict]:
    """Records with columns renamed: the person's mapping first (it always wins), then known names written in
    another case, then (only when the columns say no format) common aliases. Returns (records, automatic mapping)."""
    renamed = [(n, _rename(r, explicit)) for n, r in records]
    keys: set[str] = set()
    for _, rec in renamed:
        if isinstance(rec, dict):
            keys.update(rec)
    taken = set((explicit or {}).values())
    auto = {k: v for k, v in column_aliases.case_mapping(keys).items() if k not in (explicit or {}) and v not in taken}
    keys = {auto.get(k, k) for k in keys}
    if kind == "conversations" and detect_format(keys, kind) is None and not _nested_kind(renamed):
        aliases = {k: v for k, v in column_aliases.alias_mapping(keys).items() if v not in taken}
        original = {auto.get(k, k): k for k in auto} | {k: k for k in keys if k not in auto.values()}
        auto = {**auto, **{original.get(k, k): v for k, v in aliases.items()}}  # from the file's own names
        auto = {k: v for k, v in auto.items() if k not in (explicit or {})}
    if auto:
        renamed = [(n, _rename(r, auto)) for n, r in renamed]
    return renamed, auto


def _nested_kind(records: list) -> str | None:
    """'oasst' or 'seed_tasks' when most of the first rows are nested data of that kind."""
    sample = [nested_formats.kind_of(r) for _, r in records[:50]]
    for found in ("oasst_tree", "seed_tasks"):
        if sample and sample.count(found) * 2 > len(sample):
            return "oasst" if found == "oasst_tree" else found
    return None


def _detect(records: list, keys: set[str], kind: str) -> str | None:
    if kind == "conversations":
        nested = _nested_kind(records)
        if nested:  # before the columns: an Open-Assistant node has a 'text' column but is not plain text
            return nested
    return detect_format(keys, kind)


def _unknown_format_message(name: str, columns: list[str], records: list, kind: str) -> str:
    expected = [v for f, v in _EXPECTED.items() if KIND_OF_FORMAT.get(f) == kind or kind == "feedback"
                and f == "preference"]
    nested = nested_formats.nested_columns(records)
    if nested:
        # Renaming columns cannot unnest data: say what would work instead of suggesting a mapping.
        return (f"{name}: could not tell the format. Its columns {', '.join(nested)} hold nested objects or lists, "
                f"which no column mapping can turn into conversations. Convert the file to one conversation per row "
                f"with {'; or '.join(expected)}.")
    return (f"{name}: could not tell the format from the columns found ({', '.join(columns) or 'none'}). "
            f"Expected one of: {'; '.join(expected)}. Rename your columns, or map them in "
            "data.columns (e.g. question: instruction, answer: output).")


def _note_unused(report: DataReport, keys: set[str], fmt: str, records: list) -> None:
    if fmt not in READS:
        return
    unused = sorted(k for k in keys if k not in READS[fmt])
    report.unused_columns = unused
    for column in unused:
        filled = any(isinstance(r, dict) and r.get(column) not in (None, "", [], "[]") for _, r in records)
        if column.lower() in MATTERS and filled:  # an empty 'images' column in a CSV export says nothing
            report.warnings.append(f"column '{column}' ({MATTERS[column.lower()]}) is present but not used for "
                                   f"{fmt} rows")


def _count_extras(report: DataReport, example: dict, number: int) -> None:
    messages = example.get("messages", [])
    if example.get("tools") or any(m.get("tool_calls") for m in messages):
        report.tool_rows += 1
    for key in example.get("_placeholders", ()):
        report.placeholders[key] = report.placeholders.get(key, 0) + 1
    if example.get("_placeholders"):
        example["_row"] = number


def _skip_unfilled_placeholders(report: DataReport, cfg: DataConfig) -> None:
    """Rows still holding a placeholder with no value are skipped, with the names, unless keep_placeholders.
    A name counts as a placeholder when it recurs (in 2 rows and 5% of them at least): a {{ variable }} in one
    code example is code to learn, not a name to fill in."""
    recurring = {n for n, c in report.placeholders.items() if c >= max(2, 0.05 * len(report.examples))}
    report.placeholders = {n: c for n, c in report.placeholders.items() if n in recurring}
    values = {str(k).strip() for k, v in (cfg.placeholders or {}).items() if str(v).strip()}
    kept = []
    for example in report.examples:
        names = [n for n in example.pop("_placeholders", ()) if n in recurring and n not in values]
        row = example.pop("_row", 0)
        if names and not cfg.keep_placeholders:
            report.bad_rows.append(BadRow(row, placeholders.missing_reason(names)))
        else:
            kept.append(example)
    report.examples = kept


def _examples_of(rec: Any, fmt: str, cfg: DataConfig, kind: str) -> list[dict]:
    """One raw record -> its examples (nested formats can give several); ValueError with the reason."""
    if isinstance(rec, dict):
        media = data_shapes.media_in_row(rec)
        if media:
            raise ValueError(media)
    if fmt in ("oasst", "seed_tasks"):
        flat = nested_formats.flatten(rec, "seed_tasks" if fmt == "seed_tasks" else "oasst_tree")
        return [_finish(normalise(r, "alpaca" if fmt == "seed_tasks" else "messages", cfg.system_prompt, cfg.roles),
                        cfg) for r in flat]
    example = normalise(rec, fmt, cfg.system_prompt, cfg.roles)
    if kind == "feedback" and fmt == "preference":  # a pair is a good reply and a bad one
        return [{"prompt": example["prompt"], "completion": example[side], "label": side == "chosen"}
                for side in ("chosen", "rejected")]
    return [_finish(example, cfg)]


def _finish(example: dict, cfg: DataConfig) -> dict:
    """Placeholders with values filled in; the names found are noted for the report."""
    if "messages" not in example:
        return example  # plain text: a {{...}} there is far more often template code than a name to fill
    messages = example["messages"]
    found = placeholders.found_in(messages)
    messages = placeholders.fill(messages, cfg.placeholders)
    return {**example, "messages": messages, "_placeholders": found}


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


def _roles(base: dict, extra: dict | None) -> dict:
    """Known role names plus the person's data.roles (which win)."""
    mapped = {str(k).strip().lower(): str(v).strip().lower() for k, v in (extra or {}).items()}
    return {**base, **{k: v for k, v in mapped.items() if v in data_shapes.ROLES}}


def normalise(rec: Any, fmt: str, system_prompt: str = "", roles: dict | None = None) -> dict:
    """One raw record -> {"messages": [...], "tools"?: [...]} or {"text": ...} (or a preference_data form); raises
    ValueError with the reason."""
    if fmt in preference_data.KINDS:
        def turns_with_roles(value, role_key, content_key, what, role_map=None):
            # The person's data.roles apply to chosen/rejected, judged and prompt-only conversations too.
            return _turns(value, role_key, content_key, what, _roles(role_map or data_shapes.MESSAGE_ROLES, roles))
        return preference_data.normalise(rec, fmt, system_prompt, _text, turns_with_roles)
    if not isinstance(rec, dict):
        raise ValueError(f"row is a {type(rec).__name__}, expected an object with named fields")
    if fmt == "text":
        return {"text": _text(rec.get("text"), "'text'")}
    system = _text(rec.get("system"), "'system'", required=False) if not isinstance(rec.get("system"), list) else ""
    if fmt == "alpaca":
        instruction = _text(rec.get("instruction"), "'instruction'")
        extra = _text(rec.get("input"), "'input'", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = _history(rec.get("history"))
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": _text(rec.get("output"), "'output'")}]
    elif fmt == "prompt_completion":
        prompt, completion = rec.get("prompt"), rec.get("completion")
        messages = (_turns(prompt, "role", "content", "'prompt'", _roles(data_shapes.MESSAGE_ROLES, roles))
                    if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, "'prompt'")}])
        messages += (_turns(completion, "role", "content", "'completion'", _roles(data_shapes.MESSAGE_ROLES, roles))
                     if isinstance(completion, list)
                     else [{"role": "assistant", "content": _text(completion, "'completion'")}])
    elif fmt == "sharegpt":
        messages = _turns(rec.get("conversations"), "from", "value", "'conversations'",
                          _roles(data_shapes.SHAREGPT_ROLES, roles))
    elif fmt == "messages":
        turns = rec.get("messages")
        sharegpt_style = isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]
        messages = (_turns(turns, "from", "value", "'messages'", _roles(data_shapes.SHAREGPT_ROLES, roles))
                    if sharegpt_style else
                    _turns(turns, "role", "content", "'messages'", _roles(data_shapes.MESSAGE_ROLES, roles)))
    else:
        raise ValueError(f"unknown format {fmt}")
    # The row's own system column, then the configured system prompt, for conversations that open without one.
    for text in (system, system_prompt):
        if text.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": text})
    check_conversation(messages)
    example = {"messages": messages}
    tools = data_shapes.read_tools(rec.get("tools"))
    if tools:
        example["tools"] = tools
    return example


def _history(value: Any) -> list[dict]:
    """alpaca's optional 'history': earlier [instruction, reply] pairs, oldest first."""
    if value in (None, "", []):
        return []
    value = data_shapes.json_cell(value, "'history' is not a list of [question, reply] pairs")
    turns = []
    for pair in value if isinstance(value, list) else [None]:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError("'history' is not a list of [question, reply] pairs")
        turns += [{"role": "user", "content": _text(pair[0], "'history'")},
                  {"role": "assistant", "content": _text(pair[1], "'history'")}]
    return turns


def _turns(value: Any, role_key: str, content_key: str, what: str, role_map: dict | None = None) -> list[dict]:
    return data_shapes.read_turns(value, role_key, content_key, what, role_map or data_shapes.MESSAGE_ROLES)


check_conversation = data_shapes.check_conversation


@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]
    train_report: DataReport
    eval_report: DataReport | None
    duplicates: dict = field(default_factory=dict)
    mixed: list[dict] = field(default_factory=list)

    def details(self) -> dict:
        """What was read, deduplicated and mixed in: the keys data.json adds for studio.data_summary."""
        return {**self.train_report.details(), "duplicates": self.duplicates, "mixed": self.mixed}


def load_splits(cfg: DataConfig, seed: int, max_bytes: int | None = None, kind: str = "conversations",
                model=None, generate=None) -> Splits:
    """Training and held-out examples, from a second file or a seeded random split of the first; duplicates
    counted (and removed, per data.dedup); other data mixed into the training rows (data.mix, data.replay_share;
    `model`, a ModelConfig, answers the self-replay prompts, or `generate` stands in for it)."""
    from studio import dedup, mixing
    report = load_report(cfg, max_bytes=max_bytes, kind=kind)
    examples = list(report.examples)
    found = dedup.find(examples, near=cfg.dedup == "near") if cfg.dedup != "off" else None
    if found is not None and cfg.dedup in ("exact", "near"):
        repeats = found.repeats()
        examples = [e for i, e in enumerate(examples) if i not in repeats]
    eval_report = None
    eval_path = cfg.eval_path or (str(demo_heldout(cfg.path)) if is_demo(cfg.path) else "")
    if eval_path:
        eval_report = load_report(cfg, path=Path(eval_path), max_bytes=max_bytes, kind=kind)
        train, held_out = examples, list(eval_report.examples)
    else:
        n_eval = int(round(len(examples) * cfg.eval_fraction))
        if cfg.eval_fraction > 0 and len(examples) >= 4:
            n_eval = max(1, min(n_eval, len(examples) - 1))
        else:
            n_eval = 0
        random.Random(seed).shuffle(examples)
        train, held_out = examples[n_eval:], examples[:n_eval]
    duplicates = {}
    if found is not None:
        # Held-out rows that repeat training rows make the held-out loss look better than it is.
        leaks = dedup.leaked(train, held_out, near=cfg.dedup == "near")
        if cfg.dedup in ("exact", "near") and leaks:
            drop = set(leaks)
            held_out = [e for i, e in enumerate(held_out) if i not in drop]
        duplicates = {"mode": cfg.dedup, "exact": found.exact, "near": found.near,
                      "removed": len(found.repeats()) if cfg.dedup in ("exact", "near") else 0,
                      "held_out_repeats": len(leaks),
                      "held_out_removed": len(leaks) if cfg.dedup in ("exact", "near") else 0,
                      "groups": found.listed(report.examples)}
    if kind != "conversations" and (cfg.mix or cfg.replay_share):
        raise StudioError("data.mix and data.replay_share mix conversations into supervised fine-tuning; this stage "
                          "reads another kind of rows. Set them to {} and 0.")
    train, mixed = mixing.mix(cfg, train, seed, model=model, max_bytes=max_bytes, generate=generate)
    return Splits(train, held_out, report, eval_report, duplicates, mixed)
