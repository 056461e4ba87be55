"""Train a run with a Hugging Face trainer: data -> model -> adapters -> trainer -> adapter on disk.

Shared by every stage that trains with a TRL trainer (SFT now; DPO, KTO, reward models next). A stage
supplies a ``Recipe``: how it reads and encodes its kind of rows, and how it builds its trainer from the
common arguments this module works out. This module does the rest the same way for all of them: the speed
plan, loading the model, resuming from the last complete checkpoint, the callbacks that write the run folder
and hear Stop, saving, and retrying with smaller micro-batches after running out of memory.

Errors a person can fix are raised as StudioError, or StageFailed when the run's own training went wrong;
the worker turns them into the run's status.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from studio import models
from studio.config import RunConfig
from studio.errors import StudioError
from studio.methods import peft_config_for, quantization_for
from studio.records import Attempt, ErrorKind
from studio.rendering import EncodedSet
from studio.runs import Run, checkpoint_step
from studio.stages import Job, Outcome, StageFailed, StoppedBeforeStart
from studio.training.fast import apply
from studio.training.fast.plan import SpeedPlan, plan_speed

OOM_HINT = ("Out of memory. Lower training.batch_size (and raise training.grad_accum to keep the same "
            "effective batch), lower data.max_length, or use QLoRA on an NVIDIA GPU. Saved checkpoints are intact.")
MAX_OOM_RETRIES = 3


@dataclass
class Prepared:
    """Everything built before the first step, kept together so tests and the benchmark can reuse it."""
    cfg: RunConfig
    tokenizer: object
    model: object
    train: EncodedSet
    eval: EncodedSet
    device: str
    dtype: object
    plan: SpeedPlan
    row_factor: int = 1  # training rows a row of data becomes (GRPO: the replies written to each prompt)

    @property
    def rows(self) -> int:
        return len(self.train.rows) * self.row_factor


@dataclass
class Recipe:
    """What a trainer-based stage brings. `encode(job, tokenizer)` returns (train, held-out) rows and raises
    StudioError for data it cannot use; `build(prep, job, arguments, callbacks)` returns the trainer, given
    the arguments every stage shares (batch sizes, schedule, saving, evaluation, the plan's options)."""
    encode: Callable
    build: Callable
    live_metric_keys: tuple[str, ...] = ()
    head: str = "causal_lm"  # "score": the model gets a one-number head (a reward model)
    row_factor: int = 1  # see Prepared.row_factor


def train(job: Job, recipe: Recipe) -> Outcome:
    """Train (or resume) to the end. Out of memory with training.oom_retry on: halve the micro-batch, double
    gradient accumulation (the same effective batch, so the step count and the schedule stay as planned)
    and continue from the last complete checkpoint, up to three times. Each try is an Attempt in the run's
    status; config.yaml stays as the person wrote it."""
    run, cfg = job.run, job.config
    attempts = run.stored_status().attempts or [Attempt(cfg.training.batch_size, cfg.training.grad_accum)]
    run.update_status(attempts=attempts)
    resume = job.resume
    while True:
        try:
            return _train_once(job, recipe, attempts[-1], resume)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here; the rest goes up
            if not is_out_of_memory(err):
                raise
            last = attempts[-1]
            if not cfg.training.oom_retry or last.batch_size == 1 or len(attempts) > MAX_OOM_RETRIES \
                    or job.stop_requested():
                raise StageFailed(ErrorKind.OUT_OF_MEMORY, OOM_HINT) from None
        checkpoint = run.last_checkpoint()
        note = (f"Ran out of memory; retrying automatically with batch size {last.batch_size // 2} and gradient "
                f"accumulation {last.grad_accum * 2}.")
        attempts.append(Attempt(last.batch_size // 2, last.grad_accum * 2,
                                from_step=checkpoint_step(checkpoint) if checkpoint else 0, note=note))
        run.update_status(attempts=attempts, message=note)
        resume = checkpoint is not None
        if not resume:
            run.truncate_metrics_after(0)


def _train_once(job: Job, recipe: Recipe, attempt: Attempt, resume: bool) -> Outcome:
    from studio.training.callbacks import MarkCompleteCheckpoints, NonFiniteLossGuard, RunLogger, StopOnRequest
    run, cfg = job.run, job.config
    prep = trainer = None
    try:
        prep = prepare(job, recipe)
        checkpoint = run.last_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise StudioError(f"Run {run.id} has no complete checkpoint to resume from. Start it again instead.")
        elapsed_before = 0.0
        if checkpoint is not None:
            step = checkpoint_step(checkpoint)
            earlier = [m for m in run.metrics() if m.step <= step]
            elapsed_before = earlier[-1].elapsed_s if earlier else 0.0
            run.truncate_metrics_after(step)
        stopper = StopOnRequest(job.stop_requested, 60.0 * cfg.training.time_limit_minutes)
        guard = NonFiniteLossGuard()
        callbacks = [RunLogger(run, elapsed_before, recipe.live_metric_keys), stopper, guard,
                     MarkCompleteCheckpoints(run), *apply.trainer_callbacks(prep.plan)]
        if cfg.method.method == "adalora":
            from studio.training.callbacks import AdaLoraBudget
            callbacks.append(AdaLoraBudget())
        trainer = recipe.build(prep, job, arguments(prep, run, attempt), callbacks)
        apply.distribute(trainer, prep.plan)
        if job.stop_requested():
            raise StoppedBeforeStart
        total, _, _ = steps_plan(cfg, prep.rows, attempt)
        if checkpoint is not None and checkpoint_step(checkpoint) >= total:
            # Cut off after its last checkpoint (while saving the adapter, say): the training is done, and the
            # Trainer would train one step past the end. The adapter is that checkpoint's weights.
            trainer._load_from_checkpoint(str(checkpoint))
            save_result(prep, trainer, run)
            step = checkpoint_step(checkpoint)
            run.update_status(step=step, total_steps=total)
            return Outcome(f"Finished {step} steps; the adapter is saved (from the last checkpoint).", False, step)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if guard.bad_step is not None:
            raise StageFailed(ErrorKind.NON_FINITE_LOSS,
                                 f"The loss became NaN or infinite at step {guard.bad_step}, so training stopped. "
                                 "Lower training.learning_rate (e.g. by 10x) and start again. This adapter is not "
                                 "saved, merged or exported.")
        save_result(prep, trainer, run)
        step = trainer.state.global_step
        if stopper.timed_out:
            return Outcome(f"Stopped at step {step}: the run's time limit of {cfg.training.time_limit_minutes} "
                           "minutes passed. The adapter from that step is saved; resume to train on.", True, step)
        if stopper.stopped_at is not None:
            return Outcome(f"Stopped by you at step {step}; the adapter from that step is saved.", True, step)
        return Outcome(f"Finished {step} steps; the adapter is saved.", False, step)
    finally:
        if prep is not None:
            apply.finish(prep.plan)
        del prep, trainer
        _release_memory()


def prepare(job: Job, recipe: Recipe) -> Prepared:
    """Load and check data first (cheap, most errors live there), then the model, then wrap it in PEFT."""
    import torch
    run, cfg = job.run, job.config
    device = models.pick_device()
    dtype = models.pick_dtype(cfg.training.precision, device)
    quantization = quantization_for(cfg.method.method)
    if quantization and device != "cuda":
        models.bitsandbytes_config(quantization)  # raises the plain-language "needs an NVIDIA GPU" message
    from studio.inference import base_location
    location = base_location(cfg.model)
    if cfg.model.start_from:
        run.update_status(message=f"Starting from run {cfg.model.start_from}; loading data and model.")
    tokenizer = models.load_tokenizer(cfg.model, location)
    train_rows, eval_rows = recipe.encode(job, tokenizer)
    if job.stop_requested():
        raise StoppedBeforeStart
    from studio.training.fast.probe import probe
    plan = plan_speed(cfg, probe(cfg, location, device))
    apply.before_model_load(plan, device)
    # Seeded before PEFT draws its adapters' starting weights (the Trainer seeds only later, when it is built):
    # the same seed, data and settings give the same run, whatever this process did before.
    from transformers import set_seed
    set_seed(cfg.training.seed)
    model = models.load_model(location, dtype=dtype, device=device, quantization=quantization,
                              head=recipe.head, pad_token_id=tokenizer.pad_token_id, sharded=plan.strategy == "fsdp",
                              **apply.model_load_options(plan))
    total, _, _ = steps_plan(cfg, len(train_rows.rows) * recipe.row_factor)
    model = add_adapters(model, cfg, quantization, plan, dtype, head=recipe.head, total_steps=total)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    loaded = f"Model loaded (run {cfg.model.start_from}'s result)" if cfg.model.start_from else "Model loaded"
    run.update_status(message=f"{loaded}; training.", plan_summary=plan.summary(), plan_reasons=plan.reasons,
                      plan=plan.as_dict())
    return Prepared(cfg, tokenizer, model, train_rows, eval_rows, device, dtype, plan, recipe.row_factor)


def add_adapters(model, cfg: RunConfig, quantization: str | None, plan: SpeedPlan, dtype=None,
                 head: str = "causal_lm", total_steps: int = 0):
    """PEFT's adapters for the configured method (the model itself for full fine-tuning), with the plan's
    changes before and after wrapping."""
    from peft import get_peft_model
    apply.adapt_base_model(model, plan)
    peft_config = peft_config_for(cfg.method, models.linear_layer_names(model), head, total_steps)
    if peft_config is None:
        return model  # full fine-tuning trains the model itself
    if quantization:
        model = apply.prepare_quantized(model, plan)
    model = get_peft_model(model, peft_config)
    apply.adapt_peft_model(model, plan, dtype)
    return model


def steps_plan(cfg: RunConfig, n_rows: int, attempt: Attempt | None = None,
               processes: int | None = None) -> tuple[int, int, int]:
    """(total optimizer steps, eval every, save every) with 'about five times per run' defaults. Each of the run's
    `processes` (default: this worker's world) takes its own batch in every step."""
    from studio.distributed import world
    t = cfg.training
    batch, accum = (attempt.batch_size, attempt.grad_accum) if attempt else (t.batch_size, t.grad_accum)
    processes = world().size if processes is None else processes
    per_epoch = max(1, math.ceil(n_rows / (batch * accum * processes)))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(per_epoch * t.epochs))
    every = max(1, total // 5)
    return total, t.eval_steps or every, t.save_steps or every


def arguments(prep: Prepared, run: Run, attempt: Attempt) -> dict:
    """The trainer arguments every trainer-based stage shares (TrainingArguments' names)."""
    cfg, t = prep.cfg, prep.cfg.training
    total, eval_every, save_every = steps_plan(cfg, prep.rows, attempt)
    passes = total * attempt.batch_size * attempt.grad_accum / max(1, prep.rows)
    has_eval = bool(prep.eval.rows)
    bf16 = str(prep.dtype) == "torch.bfloat16"
    fp16 = str(prep.dtype) == "torch.float16"
    return dict(
        output_dir=str(run.checkpoints_dir), per_device_train_batch_size=attempt.batch_size,
        per_device_eval_batch_size=attempt.batch_size, gradient_accumulation_steps=attempt.grad_accum,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, lr_scheduler_type=t.scheduler,
        logging_steps=t.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=eval_every,
        save_strategy="steps", save_steps=save_every, save_total_limit=2, seed=t.seed, data_seed=t.seed,
        bf16=bf16, fp16=fp16, report_to="none", disable_tqdm=True, save_only_model=False, logging_first_step=True,
        logging_nan_inf_filter=False,  # the default filter hides NaN losses from the logs, and so from our guard
        # Several machines each keep their own run folder: each saves its checkpoints there, to resume from.
        save_on_each_node=cfg.devices.nodes > 1,
        **apply.trainer_options(prep.plan, prep.device, attempt.batch_size, cfg.data.max_length, cfg.stage,
                                passes))


def save_result(prep: Prepared, trainer, run: Run) -> None:
    """Write the adapter (or full model) plus tokenizer to adapter/, replacing any older one whole. Under FSDP2
    every process hands in its share of the weights first; the process keeping the run folder writes them."""
    state = None
    if prep.plan.strategy == "fsdp":
        # The whole weights gathered from every process's share, in host memory on the first process only.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.keeps_records:
        return
    tmp = run.path / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:
        trainer.model.save_pretrained(str(tmp), state_dict=state)
    else:
        trainer.model.save_pretrained(str(tmp))
    prep.tokenizer.save_pretrained(str(tmp))  # the chat template used in training travels with the adapter
    shutil.rmtree(run.adapter_dir, ignore_errors=True)
    os.replace(tmp, run.adapter_dir)


def is_out_of_memory(err: BaseException) -> bool:
    import torch
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _release_memory() -> None:
    """Before another attempt in the same process: the last one's model and trainer must be gone."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
