"""What a run folder says about a run, as typed records: its status, its metric lines, and the progress
both the CLI and the page show (they only format a ``Progress``; neither works anything out again).

Reading never raises for a damaged file: ``status.json`` that is not an object or holds a value of the wrong
type reads as an ``unreadable`` status naming the field, so one broken run folder cannot keep the others from
being listed. A metrics line that is not a JSON object (a crash mid-write) is skipped.

This module knows nothing about torch, training or the browser.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class State(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    UNREADABLE = "unreadable"  # the run folder's status could not be read; never written


ACTIVE = (State.QUEUED, State.RUNNING, State.STOPPING)
# A run in one of these states may continue from its last complete checkpoint.
RESUMABLE = (State.INTERRUPTED, State.FAILED, State.COMPLETED)


class ErrorKind(str, Enum):
    """Why a run failed, for code that acts on it (chat and export refuse weights from a NaN run)."""
    NONE = ""
    USER = "user"  # something the person can fix: the data, the model, a setting (the message says what)
    NON_FINITE_LOSS = "non-finite loss"
    OUT_OF_MEMORY = "out of memory"
    DISK_FULL = "disk full"
    CRASH = "crash"  # an unexpected error inside the worker; error.log has the traceback
    WORKER_DIED = "worker died"  # the worker process ended without saying why (exit code in the message)


@dataclass
class Attempt:
    """One try at training a run. Out of memory starts another with half the micro-batch and twice the
    accumulation (the same effective batch); the run's config.yaml stays as the person wrote it."""
    batch_size: int
    grad_accum: int
    from_step: int = 0
    note: str = ""


@dataclass
class RunStatus:
    state: State = State.QUEUED
    message: str = ""
    stage: str = "sft"
    step: int = 0
    total_steps: int = 0
    error_kind: ErrorKind = ErrorKind.NONE
    error: str = ""  # the technical detail behind the message, when there is one
    stopped_early: bool = False
    plan_summary: str = ""  # how the run trains, in words (training.fast.plan.SpeedPlan.summary)
    plan_reasons: list[str] = field(default_factory=list)
    plan: dict = field(default_factory=dict)  # the speed plan's fields, for tools and benchmarks
    attempts: list[Attempt] = field(default_factory=list)
    model: str = ""
    method: str = ""
    created: float = 0.0
    started: float = 0.0
    updated: float = 0.0
    elapsed_s: float = 0.0
    worker_pid: int = 0
    processes: int = 0  # how many processes train the run (several GPUs or machines); 0: not started yet
    advice: list[str] = field(default_factory=list)  # notes for the person about this run's set-up (small data...)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict:
        data = asdict(self)
        data["state"], data["error_kind"] = self.state.value, self.error_kind.value
        return data

    @classmethod
    def from_json(cls, data: Any) -> "RunStatus":
        """A status from its JSON; a damaged one becomes an ``unreadable`` status that says what is wrong."""
        try:
            return cls._parse(data)
        except ValueError as err:
            return cls(state=State.UNREADABLE, message=f"unreadable: status.json {err}")

    @classmethod
    def _parse(cls, data: Any) -> "RunStatus":
        if not isinstance(data, dict):
            raise ValueError(f"holds a {type(data).__name__}, not an object")
        values: dict = {}
        for f in fields(cls):
            if f.name not in data:
                continue  # written by an older studio, or not yet known: the default stands
            value = data[f.name]
            if f.name == "state":
                values[f.name] = _enum(State, value, f.name)
                if values[f.name] is State.UNREADABLE:
                    raise ValueError("has state 'unreadable', which is never written")
            elif f.name == "error_kind":
                values[f.name] = _enum(ErrorKind, value, f.name)
            elif f.name == "attempts":
                if not isinstance(value, list):
                    raise ValueError("field 'attempts' is not a list")
                values[f.name] = [_attempt(a) for a in value]
            else:
                values[f.name] = _typed(value, _default(f), f.name)
        return cls(**values)


def _enum(kind, value, name):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"field '{name}' has the unknown value {value!r}") from None


def _attempt(value) -> Attempt:
    if not isinstance(value, dict) or not all(isinstance(value.get(k), int) for k in ("batch_size", "grad_accum")):
        raise ValueError("field 'attempts' holds an attempt without its batch sizes")
    return Attempt(**{f.name: _typed(value[f.name], _default(f), "attempts." + f.name)
                      for f in fields(Attempt) if f.name in value})


def _default(f):
    """A field's default, or for a required field a value of its type (only the type is used)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return {"int": 0, "float": 0.0, "str": ""}[str(f.type)]


def _typed(value, default, name):
    """`value` if it has the default's type (an int is a fine float), else ValueError naming the field."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"field '{name}' should be a {type(default).__name__}, not {value!r:.40}")
    return value


@dataclass
class MetricRecord:
    """One line of metrics.jsonl: a training step's loss (with its learning rate and speed) or a held-out loss.
    A loss that was not finite is kept as the text 'nan' or 'inf' (JSON has no NaN)."""
    step: int
    epoch: float = 0.0
    elapsed_s: float = 0.0
    loss: float | str | None = None
    learning_rate: float | None = None
    grad_norm: float | str | None = None
    tokens_per_s: float | None = None
    tokens_seen: int | None = None
    eval_loss: float | str | None = None
    extra: dict = field(default_factory=dict)  # a stage's own live metrics (reward, accuracy...), by name

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "MetricRecord | None":
        """None for a line that is not a metric record (the caller skips it)."""
        if not isinstance(data, dict) or not isinstance(data.get("step"), int):
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known and (v is None or isinstance(v, (int, float, str)))}
        extra = {k: v for k, v in data.items() if k not in known and isinstance(v, (int, float, str))}
        try:
            return cls(**values, extra=extra)
        except TypeError:
            return None

    @property
    def is_training(self) -> bool:
        return self.loss is not None

    @property
    def is_evaluation(self) -> bool:
        return self.eval_loss is not None


def parse_metrics(text: str) -> list[MetricRecord]:
    records = []
    for line in text.splitlines():
        try:
            record = MetricRecord.from_json(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
        if record is not None:
            records.append(record)
    return records


def number(value) -> float | str | None:
    """A metric value for JSON: finite floats as they are, NaN and infinities as text."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def format_loss(value) -> str:
    """A loss for people: 4 decimals, or 'nan'/'inf' as stored when it was not finite."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


@dataclass
class Progress:
    """Everything a progress display needs, worked out once from a status and the metrics so far."""
    run_id: str
    state: State
    message: str
    step: int
    total_steps: int
    elapsed_s: float
    seconds_left: float | None
    tokens_per_s: float | None
    last_loss: float | str | None
    last_eval_loss: float | str | None
    plan_summary: str
    advice: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @classmethod
    def of(cls, run_id: str, status: RunStatus, metrics: list[MetricRecord]) -> "Progress":
        train = [m for m in metrics if m.is_training]
        evals = [m for m in metrics if m.is_evaluation]
        step = train[-1].step if train else status.step
        total = status.total_steps
        elapsed = train[-1].elapsed_s if train else status.elapsed_s
        left = None
        if status.active and step and total and step < total and elapsed:
            left = elapsed / step * (total - step)
        return cls(run_id=run_id, state=status.state, message=status.message, step=step, total_steps=total,
                   elapsed_s=elapsed, seconds_left=left, tokens_per_s=train[-1].tokens_per_s if train else None,
                   last_loss=train[-1].loss if train else None, last_eval_loss=evals[-1].eval_loss if evals else None,
                   plan_summary=status.plan_summary, advice=list(status.advice))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
