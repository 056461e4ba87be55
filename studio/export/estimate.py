"""How large an export will be, before it is written: weights counted from the safetensors headers (a few
kilobytes read per file, no tensor loaded), times the bytes each format stores per weight."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from studio.export.formats import check_format
from studio.runs import Run


def count_weights(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def estimated_bytes(run: Run, fmt: str) -> int:
    spec = check_format(fmt)
    adapter = sum(p.stat().st_size for p in run.adapter_dir.rglob("*") if p.is_file())
    if fmt == "adapter" or run.is_full_model():
        weights = count_weights(run.adapter_dir)
    else:
        from studio.inference import base_location
        weights = count_weights(Path(base_location(run.config().model)))
    return adapter if fmt == "adapter" else int(weights * spec.bytes_per_weight)
