"""Trainer callbacks that connect a training loop to its run folder and to the Stop button."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from transformers import TrainerCallback

from studio.records import MetricRecord, State, format_loss, number
from studio.runs import COMPLETE_MARKER, Run


class RunLogger(TrainerCallback):
    """Append every log record to metrics.jsonl with step, loss, learning rate, epoch and speed, and keep the
    status's progress current. `extra_keys`: a stage's own live metrics, copied from the logs by name."""

    def __init__(self, run: Run, elapsed_before: float = 0.0, extra_keys: tuple[str, ...] = ()):
        self.run = run
        self.elapsed_before = elapsed_before  # seconds spent in earlier sessions of a resumed run
        self.extra_keys = extra_keys
        self.started = time.time()
        self.last_time = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self.last_time = self.started
        self.last_tokens = state.num_input_tokens_seen
        self.run.update_status(state=State.RUNNING, message=f"Training: step {state.global_step} of {state.max_steps}.",
                               total_steps=state.max_steps, started=self.run.stored_status().started or self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.time()
        record = MetricRecord(step=state.global_step, epoch=round(state.epoch or 0.0, 4),
                              elapsed_s=round(self.elapsed_before + now - self.started, 2))
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.last_tokens
            span = max(now - (self.last_time or self.started), 1e-9)
            record.loss, record.learning_rate = number(logs["loss"]), number(logs.get("learning_rate", 0.0))
            record.grad_norm, record.tokens_per_s = number(logs.get("grad_norm")), round(tokens / span, 1)
            record.tokens_seen = state.num_input_tokens_seen
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        elif "eval_loss" in logs:
            record.eval_loss = number(logs["eval_loss"])
        else:
            return  # the end-of-training summary; the run's status says the same
        record.extra = {k: number(logs[k]) for k in self.extra_keys if k in logs}
        self.run.append_metrics(record)
        if record.is_training:
            self.run.update_status(message=f"Training: step {state.global_step} of {state.max_steps}, "
                                   f"loss {format_loss(record.loss)}.", step=state.global_step,
                                   total_steps=state.max_steps, elapsed_s=record.elapsed_s)


class StopOnRequest(TrainerCallback):
    """End training after the current step once a Stop is asked for (the page's button, Ctrl-C, a signal),
    or once the run's time limit has passed (`time_limit_s`, counted from the first step of this session)."""

    def __init__(self, stop_requested: Callable[[], bool], time_limit_s: float = 0.0):
        self.stop_requested = stop_requested
        self.time_limit_s = time_limit_s
        self.started = time.monotonic()
        self.stopped_at: int | None = None
        self.timed_out = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        from studio.distributed import agree_any
        timed_out = bool(self.time_limit_s) and time.monotonic() - self.started > self.time_limit_s
        # Every process of a run stops at the same step, whichever of them heard the Stop (only the first machine
        # sees the page's stop request; a signal reaches one machine's processes).
        self.timed_out, stop = agree_any(timed_out, self.stop_requested())
        if self.timed_out or stop:
            control.should_training_stop = True
            control.should_save = False
            self.stopped_at = state.global_step
        return control


class NonFiniteLossGuard(TrainerCallback):
    """A NaN or infinite loss never recovers: stop at once rather than train garbage for hours."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_step = state.global_step
            control.should_training_stop = True
            control.should_save = False
        return control


class MarkCompleteCheckpoints(TrainerCallback):
    """Trainer calls on_save after a checkpoint is fully written; the marker lets resume skip torn ones."""

    def __init__(self, run: Run):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        folder = self.run.checkpoints_dir / f"checkpoint-{state.global_step}"
        if self.run.keeps_records and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(str(time.time()), encoding="utf-8")


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA moves its rank budget between layers from the gradients of each step; the Trainer does not call
    it, so it happens here, after the backward and before the optimizer clears the gradients."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        base = getattr(model, "base_model", None)
        if base is not None and hasattr(base, "update_and_allocate"):
            base.update_and_allocate(state.global_step)
