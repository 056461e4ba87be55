"""A run is a folder on disk; everything about it can be read back from there after any restart.

``runs/<run-id>/``:
  config.yaml      the resolved config the run was started with
  status.json      state (queued/running/stopping/completed/failed/interrupted), message, progress
  metrics.jsonl    one JSON object per log record, append-only
  data.json        what the data looked like (format, counts, token lengths)
  adapter/         the trained adapter in PEFT format (or the whole model for full fine-tuning)
  checkpoints/     resumable trainer checkpoints; a finished one holds a COMPLETE marker
  merged/          the adapter merged into its base, after ``studio merge``
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from studio.config import RunConfig, from_dict, to_dict
from studio.errors import StudioError
from studio.paths import check_safe_name, is_within, runs_dir

STATES = ("queued", "running", "stopping", "completed", "failed", "interrupted")
ACTIVE_STATES = ("queued", "running", "stopping")
COMPLETE_MARKER = "COMPLETE"


def format_loss(value) -> str:
    """A loss for people: 4 decimals, or 'nan'/'inf' as stored when it was not finite."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a ``checkpoint-<step>`` folder was saved at."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


# Status is read, changed and written back by the training thread (progress) and by request threads (stop):
# one at a time, or a state set by one is overwritten by the other's stale copy.
_STATUS_LOCK = threading.RLock()


def _write_atomic(path: Path, text: str) -> None:
    # Write-then-rename: a reader (or a crash) never sees half a status file. The temporary name is per
    # thread: two threads sharing one would rename each other's file away.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Run:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    # --- config ---
    def write_config(self, cfg: RunConfig) -> None:
        _write_atomic(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def config(self) -> RunConfig:
        data = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        return from_dict(data, source=str(self.path / "config.yaml"))

    # --- status ---
    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "queued", "message": ""}

    def set_status(self, state: str | None, message: str = "", **extra) -> dict:
        """Change the run's status; state None keeps the current one (progress updates)."""
        assert state is None or state in STATES, state
        with _STATUS_LOCK:
            status = self.status()
            status.update(extra)
            status.update({"state": state or status.get("state", "running"), "message": message,
                           "updated": time.time(), "pid": os.getpid()})
            _write_atomic(self.path / "status.json", json.dumps(status, indent=1))
        return status

    # --- metrics ---
    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
        return records

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, forget records past the checkpoint step: those steps are trained again."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        _write_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def write_json(self, name: str, data: dict) -> None:
        _write_atomic(self.path / name, json.dumps(data, indent=1))

    def read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    # --- checkpoints ---
    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose write finished (marker present), oldest first; half-written ones are ignored."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=checkpoint_step)

    def last_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file() or (self.adapter_dir / "config.json").is_file()

    def is_full_model(self) -> bool:
        return (self.adapter_dir / "config.json").is_file() and not (self.adapter_dir / "adapter_config.json").is_file()

    def summary(self) -> dict:
        status = self.status()
        metrics = self.metrics()
        losses = [m["loss"] for m in metrics if "loss" in m]
        return {"id": self.id, "state": status.get("state"), "message": status.get("message", ""),
                "created": status.get("created"), "step": metrics[-1]["step"] if metrics else 0,
                "total_steps": status.get("total_steps"), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "has_adapter": self.has_adapter(),
                "model": status.get("model"), "method": status.get("method")}


def new_run(cfg: RunConfig) -> Run:
    """Create ``runs/<id>`` for a config; the id is the config's name (made unique) or a timestamp."""
    base = cfg.name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    check_safe_name(base, "run name")
    root = runs_dir()
    run_id, n = base, 1
    while True:
        try:
            (root / run_id).mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            run_id = f"{base}-{n}"
    run = Run(root / run_id)
    run.write_config(cfg)
    run.set_status("queued", "Waiting to start.", created=time.time(), model=cfg.model.name_or_path,
                   method=cfg.method.method)
    return run


def open_run(ref: str) -> Run:
    """A run from its id or its folder path (which must be inside the runs folder or hold a run)."""
    root = runs_dir()
    candidate = Path(ref).expanduser()
    if candidate.is_dir() and (candidate / "config.yaml").is_file():
        return Run(candidate.resolve())
    check_safe_name(ref, "run id")
    path = root / ref
    if not is_within(path, root) or not (path / "config.yaml").is_file():
        known = ", ".join(r.id for r in list_runs()[:5]) or "none yet"
        raise StudioError(f"No run called {ref!r} in {root}. Recent runs: {known}. List them with: studio runs")
    return Run(path)


def list_runs() -> list[Run]:
    """All runs, newest first."""
    runs = [Run(p) for p in runs_dir().iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.status().get("created") or 0, reverse=True)


def _alive(pid) -> bool:
    # A run trained by another live process (the CLI beside the UI) is not interrupted.
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def mark_interrupted_runs() -> list[str]:
    """After a restart no thread is training, so any run still marked active was cut off."""
    marked = []
    for run in list_runs():
        status = run.status()
        if status.get("state") in ACTIVE_STATES and not _alive(status.get("pid")):
            step = run.last_checkpoint()
            hint = (f" It can resume from {step.name}." if step else " No checkpoint was saved; start it again.")
            run.set_status("interrupted", "The studio stopped while this run was training." + hint)
            marked.append(run.id)
    return marked
