"""Stages: what a run does. Supervised fine-tuning now; preference training, reward models, GRPO, evaluation
and export jobs are each a module of their own here, behind the one small interface below.

A stage module holds, at its top level, only light things (no torch): a ``STAGE`` describing it, and the
dataclass of its own settings if it has any. Its ``run(job)`` does the work and imports what it needs.
Modules in this package that define ``STAGE`` are found by themselves: adding a stage is one new module (and
its settings appear in the form from that dataclass); the launcher, the run records and the worker need no
change. A stage's settings live in the run config under the stage's name, e.g. ``dpo: {beta: 0.1}``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studio.config import RunConfig
    from studio.runs import Run

# What rows a stage reads (the Data tab's checks and the SFT stage's refusals are keyed on these).
DATA_KINDS = ("conversations", "preference_pairs", "feedback", "prompts", "none")


@dataclass(frozen=True)
class LiveMetric:
    key: str  # the MetricRecord field or extra name
    label: str  # the plot's series name
    chart: str = "loss"  # "loss": beside the losses; "stage": the stage's own plot below them


@dataclass(frozen=True)
class Stage:
    name: str  # the config's `stage` value
    label: str  # for menus: "Supervised fine-tuning"
    help: str  # one plain-language paragraph for the form
    data_kind: str  # one of DATA_KINDS
    run: Callable[["Job"], "Outcome"]  # does the work inside the worker process; raises StudioError for user errors
    settings: type | None = None  # the stage's own settings dataclass (fields made with config.setting)
    live_metrics: tuple[LiveMetric, ...] = ()  # what the Train tab plots while it runs
    demo_preset: str = ""  # presets/<name>.yaml: its one-click demo
    trains: bool = True  # takes the one training slot (a GPU); an export job might not
    produces: tuple[str, ...] = ("adapter",)  # what the run folder holds when it is done
    picker: bool = True  # offered in the Train tab's "What to train" (an evaluation has a tab of its own)


class StageFailed(Exception):
    """The stage's own work went wrong in a way its message explains to a person (kind: records.ErrorKind).
    Raised from a stage's run(); the worker records it as the run's failure."""

    def __init__(self, kind, message: str):
        super().__init__(message)
        self.kind = kind


class StoppedBeforeStart(Exception):
    """A Stop arrived while the run was still being set up (reading data, loading the model)."""


@dataclass
class Outcome:
    """How a stage ended when it did not fail: the message people see, and whether a Stop cut it short."""
    message: str
    stopped_early: bool = False
    step: int = 0


@dataclass
class Job:
    """What the worker hands a stage: the run folder, its config, and how to hear a Stop."""
    run: "Run"
    config: "RunConfig"
    resume: bool
    stop_requested: Callable[[], bool]
    notes: dict = field(default_factory=dict)  # free for the stage (e.g. what its trainer needs from setup)


@lru_cache(maxsize=1)
def registry() -> dict[str, Stage]:
    """Every stage module in this package, by stage name."""
    found: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        stage = getattr(module, "STAGE", None)
        if isinstance(stage, Stage):
            found[stage.name] = stage
    return dict(sorted(found.items(), key=lambda item: (item[0] != "sft", item[0])))


def register(stage: Stage) -> None:
    """Add a stage defined outside this package (tests, plug-ins)."""
    registry()[stage.name] = stage


def get(name: str) -> Stage:
    from studio.errors import StudioError
    stages = registry()
    if name not in stages:
        raise StudioError(f"stage = {name!r} is not one of: {', '.join(stages)}.")
    return stages[name]
