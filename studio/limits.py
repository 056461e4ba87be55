"""Bounds on what a visitor of a shared studio can make it do, in one place.

A shared studio sets them (the defaults below, or STUDIO_LIMITS as JSON of these fields) for itself and for the worker processes it starts (through the environment, as
``STUDIO_LIMITS``, so a run started from the page reads its data under the same bounds as the Data tab). A
studio used by its owner alone has none, apart from the upload size.

Data is bounded after decompression and parsing, not only by file size: a few hundred bytes of Parquet can
hold tens of megabytes of text.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENV = "STUDIO_LIMITS"


@dataclass(frozen=True)
class Limits:
    max_rows: int = 100_000  # rows in a data file
    max_row_chars: int = 200_000  # characters in one row (a JSONL line, a CSV or Parquet record)
    max_total_chars: int = 200_000_000  # characters of text in a whole file, once decompressed
    upload_quota_mb: int = 500  # everything one visitor has uploaded and not yet cleaned away
    check_seconds: int = 120  # a data check (reading, checking, tokenising) runs at most this long
    check_memory_mb: int = 3072  # ... and with at most this much memory, in a process of its own
    chat_max_new_tokens: int = 512  # the longest chat reply
    chat_seconds: int = 120  # the longest a chat reply may take
    template_seconds: float = 5.0  # one conversation through the chat template, while training
    run_minutes: float = 240.0  # a run stops itself after this long (saving its adapter): none holds the slot forever
    stop_grace_s: int = 120  # after Stop, how long a run may take to save before it is ended
    export_seconds: int = 900  # one export (merge, convert, quantise, check) runs at most this long
    export_max_mb: int = 2048  # ... and is refused when its files would be larger (estimated before it starts)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "Limits | None":
        """The limits this process runs under, or None where none were set (an unshared studio)."""
        text = os.environ.get(ENV)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError):
            return cls()  # set but unreadable: the safe side, the defaults


def install(limits: "Limits | None") -> None:
    """Make `limits` this process's, and its future workers'."""
    if limits is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = limits.to_env()
