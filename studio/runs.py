"""A run is a folder on disk; everything about it can be read back from there after any restart.

``runs/<run-id>/``:
  config.yaml      the resolved config the run was started with (never rewritten)
  status.json      a ``records.RunStatus``: state, message, progress, the plan, out-of-memory attempts
  metrics.jsonl    one ``records.MetricRecord`` per line, append-only
  samples.jsonl    replies written at each evaluation, with their scores (GRPO)
  stop-request     present while a Stop is pending; the worker checks for it every step
  owner            who started the run from a shared page (never shown to anyone)
  worker.log       what the worker process printed (the tail explains a worker that died silently)
  data.json        what the data looked like (format, counts, token lengths)
  adapter/         the trained adapter in PEFT format (or the whole model for full fine-tuning)
  checkpoints/     resumable trainer checkpoints; a finished one holds a COMPLETE marker
  merged/          the adapter merged into its base, after ``studio merge``

Only the worker writes a live run's status; the launcher writes it before the worker starts and after it
has ended. This module knows nothing about torch or the browser.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from studio.config import RunConfig, from_dict, to_dict
from studio.errors import StudioError
from studio.paths import check_safe_name, runs_dir
from studio.records import ACTIVE, MetricRecord, RunStatus, State, parse_metrics

# The end-of-run forgetting check's verdict (studio/training/forgetting.py writes it; the page reads it).
FORGETTING_FILE = "forgetting.json"

COMPLETE_MARKER = "COMPLETE"
STOP_REQUEST = "stop-request"


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a ``checkpoint-<step>`` folder was saved at."""
    return int(checkpoint.name.rsplit("-", 1)[-1])


# Within one process, status is read, changed and written back by more than one thread (the training loop's
# progress, a signal's stop): one at a time, or one's change is lost to the other's stale copy.
_STATUS_LOCK = threading.RLock()


def write_atomic(path: Path, text: str) -> None:
    # Write-then-rename: a reader (or a crash) never sees half a file. The temporary name is per process and
    # thread: two writers sharing one would rename each other's file away.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Run:
    path: Path
    keeps_records = True  # False for the processes of a run that must not write its folder (PeerRun)

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

    @property
    def log_file(self) -> Path:
        return self.path / "worker.log"

    # --- config ---
    def write_config(self, cfg: RunConfig) -> None:
        write_atomic(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def config(self) -> RunConfig:
        from studio.presets import load_yaml
        try:
            text = (self.path / "config.yaml").read_text(encoding="utf-8")
            data = load_yaml(text, f"run {self.id}: config.yaml")
        except (OSError, UnicodeDecodeError) as err:
            raise StudioError(f"Run {self.id}: config.yaml cannot be read ({type(err).__name__}).") from None
        except StudioError as err:
            raise StudioError(f"Run {self.id}: config.yaml cannot be read ({err}).") from None
        return from_dict(data, source=f"run {self.id}: config.yaml")

    # --- status ---
    def stored_status(self) -> RunStatus:
        """status.json as written, or queued when there is none yet."""
        try:
            text = (self.path / "status.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            return RunStatus()
        except (OSError, UnicodeDecodeError) as err:
            return RunStatus(state=State.UNREADABLE, message=f"unreadable: status.json ({type(err).__name__})")
        try:
            return RunStatus.from_json(json.loads(text))
        except json.JSONDecodeError:
            return RunStatus(state=State.UNREADABLE, message="unreadable: status.json is not valid JSON")

    def status(self) -> RunStatus:
        """The status as people should see it: a live run with a Stop pending shows as stopping."""
        status = self.stored_status()
        if status.state in (State.QUEUED, State.RUNNING) and self.stop_requested():
            status.state = State.STOPPING
            status.message = "Stopping after the current step, then saving the adapter."
        return status

    def update_status(self, **changes) -> RunStatus:
        """Change fields of the stored status (state, message, step...) and write it whole."""
        with _STATUS_LOCK:
            status = self.stored_status()
            if status.state is State.UNREADABLE:
                status = RunStatus()
            for name, value in changes.items():
                if not hasattr(status, name):
                    raise AttributeError(f"RunStatus has no field {name!r}")
                setattr(status, name, value)
            status.updated = time.time()
            write_atomic(self.path / "status.json", json.dumps(status.to_json(), indent=1))
        return status

    # --- owner ---
    def owner(self) -> str:
        try:
            return (self.path / "owner").read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    # --- stop requests ---
    def request_stop(self) -> None:
        write_atomic(self.path / STOP_REQUEST, str(time.time()))

    def stop_requested(self) -> bool:
        return (self.path / STOP_REQUEST).exists()

    def clear_stop_request(self) -> None:
        (self.path / STOP_REQUEST).unlink(missing_ok=True)

    # --- metrics ---
    def append_metrics(self, record: MetricRecord) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record.to_json()) + "\n")
            fh.flush()

    def metrics(self) -> list[MetricRecord]:
        try:
            return parse_metrics((self.path / "metrics.jsonl").read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return []

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, forget records past the checkpoint step: those steps are trained again."""
        kept = [r for r in self.metrics() if r.step <= step]
        write_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r.to_json()) + "\n" for r in kept))

    def latest_samples(self) -> list[dict]:
        """The replies written at the last evaluation (samples.jsonl: GRPO's, with their rewards)."""
        try:
            lines = (self.path / "samples.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        last = max((r["step"] for r in rows), default=None)
        return [r for r in rows if r["step"] == last]

    def write_json(self, name: str, data: dict) -> None:
        write_atomic(self.path / name, json.dumps(data, indent=1))

    def read_json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    # --- checkpoints ---
    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose write finished (marker present), oldest first; half-written ones are ignored."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*")
                 if (p / COMPLETE_MARKER).is_file() and p.name.rsplit("-", 1)[-1].isdigit()]
        return sorted(found, key=checkpoint_step)

    def last_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file() or (self.adapter_dir / "config.json").is_file()

    def is_full_model(self) -> bool:
        return (self.adapter_dir / "config.json").is_file() and not (self.adapter_dir / "adapter_config.json").is_file()

    def summary(self) -> dict:
        """One line of a run list; a run whose files cannot be read still gets its line, saying so."""
        status = self.status()
        metrics = self.metrics()
        losses = [m.loss for m in metrics if m.is_training]
        return {"id": self.id, "state": status.state.value, "message": status.message,
                "created": status.created or _folder_time(self.path), "step": metrics[-1].step if metrics else 0,
                "total_steps": status.total_steps, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "has_adapter": self.has_adapter(),
                "model": status.model, "method": status.method, "stage": status.stage}


class PeerRun(Run):
    """The run folder as the other processes of a distributed run see it (studio/distributed.py): they read it
    like the first process does, and what they would write is left to the one that keeps the records."""
    keeps_records = False

    def write_config(self, cfg: RunConfig) -> None:
        pass

    def update_status(self, **changes) -> RunStatus:
        """The status as it would be, not written: the process's own outcome (its exit code comes from it)."""
        status = self.stored_status()
        for name, value in changes.items():
            setattr(status, name, value)
        return status

    def append_metrics(self, record: MetricRecord) -> None:
        pass

    def truncate_metrics_after(self, step: int) -> None:
        pass

    def write_json(self, name: str, data: dict) -> None:
        pass

    def clear_stop_request(self) -> None:
        pass


def started_on(cfg: RunConfig) -> str:
    """What a run trains, as its run list shows it: the base model, and the run it continues from if any."""
    if cfg.model.start_from:
        return f"{cfg.model.name_or_path}, from run {cfg.model.start_from}"
    return cfg.model.name_or_path


def _folder_time(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def new_run(cfg: RunConfig, owner: str = "") -> Run:
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
    try:
        if owner:
            write_atomic(run.path / "owner", owner)
        run.write_config(cfg)
        run.update_status(state=State.QUEUED, message="Waiting to start.", created=time.time(), stage=cfg.stage,
                          model=started_on(cfg), method=cfg.method.method)
    except OSError as err:
        shutil.rmtree(run.path, ignore_errors=True)  # no half-made run folder left behind
        if err.errno == errno.ENOSPC:
            raise StudioError("The disk is full, so the run could not be created. Free some space (old runs "
                              "and exports), then start again.") from None
        raise
    return run


def open_run(ref: str | Path) -> Run:
    """A run from its id, or from its folder when that folder lies directly in the runs folder."""
    root = runs_dir()
    if isinstance(ref, Path) or (isinstance(ref, str) and os.sep in ref):
        candidate = Path(ref).expanduser().resolve()
        if candidate.parent == root.resolve() and (candidate / "config.yaml").is_file():
            return Run(root / candidate.name)
        raise StudioError(f"{ref} is not a run folder of this studio ({root}). Name a run by its id; list them "
                          "with: studio runs")
    check_safe_name(ref, "run id")
    path = root / ref
    if not (path / "config.yaml").is_file():
        known = ", ".join(r.id for r in list_runs()[:5]) or "none yet"
        raise StudioError(f"No run called {ref!r}. Recent runs: {known}. List them with: studio runs")
    return Run(path)


def list_runs() -> list[Run]:
    """All runs, newest first; a folder whose files are damaged is still listed."""
    runs = [Run(p) for p in runs_dir().iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: r.stored_status().created or _folder_time(r.path), reverse=True)


def is_active(run: Run) -> bool:
    return run.stored_status().state in ACTIVE
