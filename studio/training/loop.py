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
import json
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
from studio.training.fast.plan import SpeedPlan, data_lengths, plan_speed

# Under this many training rows the run is told, at its start, what so little data will do.
SMALL_DATA_ROWS = 200
# A run shorter than this many steps is told it may teach little.
FEW_STEPS = 10
# The most prompts the sample replies answer (training.samples' range; typed prompts past it are left out).
MAX_SAMPLES = 20
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
        run.update_status(advice=small_data_advice(cfg, len(prep.train.rows), len(prep.eval.rows), prep.rows, attempt))
        checkpoint = run.last_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise StudioError(f"Run {run.id} has no complete checkpoint to resume from. Start it again instead.")
        elapsed_before = 0.0
        if checkpoint is not None:
            step = checkpoint_step(checkpoint)
            earlier = [m for m in run.metrics() if m.step <= step]
            elapsed_before = earlier[-1].elapsed_s if earlier else 0.0
            run.truncate_metrics_after(step)
        _forget_samples_after(run, checkpoint_step(checkpoint) if checkpoint is not None else None)
        stopper = StopOnRequest(job.stop_requested, 60.0 * cfg.training.time_limit_minutes)
        guard = NonFiniteLossGuard()
        callbacks = [RunLogger(run, elapsed_before, recipe.live_metric_keys), stopper, guard,
                     MarkCompleteCheckpoints(run), *apply.trainer_callbacks(prep.plan)]
        if cfg.method.method == "adalora":
            from studio.training.callbacks import AdaLoraBudget
            callbacks.append(AdaLoraBudget())
        early = _early_stopping(prep)
        forgetting = _forgetting_check(job, recipe, prep)
        callbacks += [c for c in (early, _sample_replies(job, recipe, prep), forgetting, _tensorboard(run))
                      if c is not None]
        trainer = recipe.build(prep, job, arguments(prep, run, attempt), callbacks)
        apply.distribute(trainer, prep.plan)
        if job.stop_requested():
            raise StoppedBeforeStart
        total, _, _ = steps_plan(cfg, prep.rows, attempt)
        if checkpoint is not None and checkpoint_step(checkpoint) >= total:
            # Cut off after its last checkpoint (while saving the adapter, say): the training is done, and the
            # Trainer would train one step past the end. The adapter is that checkpoint's weights.
            kept = _best_of_checkpoint(run, checkpoint) if cfg.training.keep_best and prep.eval.rows else None
            trainer._load_from_checkpoint(str(kept[0] if kept else checkpoint))
            save_result(prep, trainer, run)
            step = checkpoint_step(checkpoint)
            run.update_status(step=step, total_steps=total)
            if kept:
                return Outcome(f"Finished {step} steps; {_kept_words(checkpoint_step(kept[0]), kept[1])}.", False,
                               step)
            return Outcome(f"Finished {step} steps; the adapter is saved (from the last checkpoint).", False, step)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if guard.bad_step is not None:
            raise StageFailed(ErrorKind.NON_FINITE_LOSS,
                                 f"The loss became NaN or infinite at step {guard.bad_step}, so training stopped. "
                                 "Lower training.learning_rate (e.g. by 10x) and start again. This adapter is not "
                                 "saved, merged or exported.")
        kept = keep_best(trainer, run) if cfg.training.keep_best and prep.eval.rows else None
        save_result(prep, trainer, run)
        step = trainer.state.global_step
        saved = _kept_words(*kept) if kept else "the adapter from that step is saved"
        if stopper.timed_out:
            return Outcome(f"Stopped at step {step}: the run's time limit of {cfg.training.time_limit_minutes} "
                           f"minutes passed. {saved[0].upper()}{saved[1:]}; resume to train on.", True, step)
        if stopper.stopped_at is not None:
            return Outcome(f"Stopped by you at step {step}; {saved}.", True, step)
        checked = held_out_trend(_held_out_losses(trainer.state.log_history)) + \
            _finish_forgetting_check(forgetting, trainer, run)
        if early is not None and early.stopped_at is not None:
            return Outcome(_early_stop_words(early, step, kept) + checked, True, step)
        return Outcome(f"Finished {step} steps; {_kept_words(*kept) if kept else 'the adapter is saved'}."
                       + checked, False, step)
    finally:
        if prep is not None:
            apply.finish(prep.plan)
        del prep, trainer
        _release_memory()


def _early_stopping(prep: Prepared):
    """The early-stopping callback when it is asked for and there is a held-out loss to watch."""
    from studio.training.callbacks import StopWhenHeldOutLossStalls
    patience = prep.cfg.training.early_stopping_patience
    return StopWhenHeldOutLossStalls(patience) if patience and prep.eval.rows else None


def _sample_replies(job: Job, recipe: Recipe, prep: Prepared):
    """The sample-replies callback for a stage that writes replies, when there are prompts to answer. GRPO keeps
    its own samples (its replies with their rewards), so it gets none."""
    from studio.training.callbacks import SampleReplies
    cfg = prep.cfg
    if recipe.head != "causal_lm" or cfg.stage == "grpo" or cfg.training.samples == 0:
        return None
    conversations = sample_conversations(cfg, job.notes.get("held_out_examples", []))
    return SampleReplies(job.run, prep.tokenizer, conversations, cfg.data.max_length) if conversations else None


def _forgetting_check(job: Job, recipe: Recipe, prep: Prepared):
    """The end-of-run forgetting check (training.forgetting_check), for stages that write replies."""
    from studio.training import forgetting
    from studio.training.callbacks import SampleReplies
    cfg = prep.cfg
    if recipe.head != "causal_lm":
        return None
    count, why_not = forgetting.questions_for(cfg.training.forgetting_check, prep.device,
                                              prep.model.num_parameters())
    if not count:
        if why_not:
            job.run.update_status(advice=[*job.run.stored_status().advice, why_not])
        return None
    from studio.evaluation import PROBE_TOKENS
    return forgetting.ForgettingCheck(job.run, SampleReplies(job.run, prep.tokenizer, [], cfg.data.max_length,
                                                             max_new_tokens=PROBE_TOKENS), count)


def _finish_forgetting_check(check, trainer, run: Run) -> str:
    if check is None:
        return ""
    from studio.training import forgetting
    run.update_status(message=f"Training is done; asking {len(check.items)} general questions to check the model "
                              "has not forgotten what it knew.")
    return forgetting.summary(check.finish(trainer.model, trainer.args))


def sample_conversations(cfg: RunConfig, held_out: list[dict]) -> list[list[dict] | dict]:
    """What the sample replies answer: the prompts typed in (up to MAX_SAMPLES, with the data's system prompt as
    training saw it), or else the first `training.samples` held-out conversations up to their last reply."""
    t = cfg.training
    if t.samples == 0:
        return []
    if t.sample_prompts:
        system = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
        return [[*system, {"role": "user", "content": p}] for p in t.sample_prompts[:MAX_SAMPLES] if p.strip()]
    prompts = []
    for example in held_out:
        messages = example.get("messages") or []  # plain-text rows have no prompt to answer
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is not None and any(m.get("role") == "user" for m in messages[:last]):
            turns = [dict(m) for m in messages[:last]]
            # A tool-calling row is asked with its tools, as it was trained (rendering.reply_prompt).
            prompts.append({"messages": turns, "tools": example["tools"]} if example.get("tools") else turns)
        if len(prompts) == t.samples:
            break
    return prompts


def _forget_samples_after(run: Run, step: int | None) -> None:
    """samples.jsonl as of where training starts: on resume, rows past the checkpoint's step are written again;
    on a fresh start (an out-of-memory retry without a checkpoint) none of the old rows stand."""
    path = run.path / "samples.jsonl"
    if not run.keeps_records or not path.is_file():
        return
    from studio.runs import write_atomic
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if step is not None and isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def _tensorboard(run: Run):
    from studio.training.callbacks import tensorboard_callback
    return tensorboard_callback(run)


def keep_best(trainer, run: Run) -> tuple[int, float] | None:
    """training.keep_best: put the weights with the lowest held-out loss into the trainer's model, from their
    checkpoint (or as they are when the last step was the best); (that step, its loss), or None when no held-out
    loss was measured. Every process decides from the same log history and checkpoints, so all load the same."""
    state = trainer.state
    candidates = [(loss, step) for step, loss in _held_out_losses(state.log_history)
                  if step == state.global_step or (run.checkpoints_dir / f"checkpoint-{step}").is_dir()]
    if not candidates:
        return None
    loss, step = min(candidates)
    if step != state.global_step:
        trainer._load_from_checkpoint(str(run.checkpoints_dir / f"checkpoint-{step}"))
    return step, loss


def _best_of_checkpoint(run: Run, checkpoint) -> tuple[object, float] | None:
    """(the checkpoint with the lowest held-out loss, that loss) as the trainer state saved in `checkpoint`
    recorded them; None when it recorded none."""
    try:
        history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        return None
    candidates = [(loss, step) for step, loss in _held_out_losses(history)
                  if (run.checkpoints_dir / f"checkpoint-{step}").is_dir()]
    if not candidates:
        return None
    loss, step = min(candidates)
    return run.checkpoints_dir / f"checkpoint-{step}", loss


def _held_out_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], float(h["eval_loss"])) for h in log_history
            if isinstance(h.get("eval_loss"), (int, float)) and math.isfinite(h["eval_loss"]) and "step" in h]


# Held-out loss changing by less than this share between the first and the last evaluation counts as flat.
FLAT_SHARE = 0.02


def held_out_trend(losses: list[tuple[int, float]]) -> str:
    """One sentence on how the held-out loss moved over the run (`losses`: (step, loss) of each evaluation), and
    what that means for new prompts; empty without held-out rows."""
    if not losses:
        return ""
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    if len(losses) == 1:
        return f" Held-out loss {last:.3f} at step {last_step}."
    moved = f"from {first:.3f} at step {first_step} to {last:.3f} at step {last_step}"
    if last < first * (1 - FLAT_SHARE):
        return f" Held-out loss fell {moved}: it does better on examples it never trained on."
    if last > first * (1 + FLAT_SHARE):
        return (f" Held-out loss rose {moved}: it learned its training rows more than what carries over to new "
                "prompts; fewer epochs or a lower learning rate usually help.")
    return (f" Held-out loss stayed about the same ({moved}): little of what it learned carries over yet; more "
            "steps or a higher learning rate may help.")


def _kept_words(step: int, loss: float) -> str:
    return f"the adapter kept is the one from step {step}, where the held-out loss was lowest ({loss:.4f})"


def _early_stop_words(early, step: int, kept: tuple[int, float] | None) -> str:
    known = early.best_loss is not None and not kept  # keep_best's words name the best step themselves
    best = f" (lowest {early.best_loss:.4f} at step {early.best_step})" if known else ""
    saved = _kept_words(*kept) if kept else f"the adapter from step {step} is saved"
    return (f"Stopped early at step {step}: the held-out loss had not improved for {early.patience} evaluations in "
            f"a row{best}, so more training would likely only memorise the training rows. {saved[0].upper()}"
            f"{saved[1:]}.")


def small_data_advice(cfg: RunConfig, train_rows: int, eval_rows: int, n_rows: int, attempt: Attempt) -> list[str]:
    """Notes for a person at the start of a run, in plain words: what a small training set will do, a run too
    short to teach much, and overfitting guards that have no held-out rows to watch. `n_rows`: the rows the step
    plan counts (train_rows times the replies per prompt for GRPO)."""
    t = cfg.training
    notes = []
    total, _, _ = steps_plan(cfg, n_rows, attempt)
    per_epoch = steps_per_epoch(cfg, n_rows, attempt)
    if train_rows < SMALL_DATA_ROWS:
        batch = attempt.batch_size * attempt.grad_accum * _processes()
        per_step = f", {batch} per step" if n_rows == train_rows else ""
        notes.append(f"{train_rows} training rows{per_step}: each pass over them (an epoch) is {per_epoch} "
                     f"step{'s' if per_epoch != 1 else ''}, {total} step{'s' if total != 1 else ''} in all. With so "
                     "few rows the model can learn them by heart instead of the habit behind them: watch the "
                     "held-out loss, and if it starts rising while the training loss keeps falling, train for "
                     "fewer epochs or turn on early stopping or 'keep best'. More varied rows help most.")
        if eval_rows == 0:
            notes.append("No rows are held out, so nothing shows whether the model learns the habit or memorises "
                         "the rows: set a held-out share (e.g. 0.1) or a held-out file on the Data tab.")
    if total < FEW_STEPS:
        more = (f"raise Max steps to {FEW_STEPS} or more" if t.max_steps > 0 else
                f"raise Epochs to {math.ceil(FEW_STEPS / per_epoch)} (about {FEW_STEPS} steps or more)")
        notes.append(f"{total} step{'s' if total != 1 else ''} may teach the model little: {more}, or add rows.")
    if eval_rows == 0 and (t.early_stopping_patience or t.keep_best):
        notes.append("Early stopping and 'keep best' compare held-out losses, and this run has no held-out rows, so "
                     "they are off for it.")
    return notes


def _processes() -> int:
    from studio.distributed import world
    return world().size


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
    # The rows' own lengths, where the stage's rows carry them: the memory estimate then reads the data, not just
    # batch_size x max_length.
    plan = plan_speed(cfg, probe(cfg, location, device), data_lengths(train_rows.rows))
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
    peft_config = peft_config_for(cfg.method, models.linear_layer_names(model), head, total_steps,
                                  models.layer_count(model))
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
    t = cfg.training
    per_epoch = steps_per_epoch(cfg, n_rows, attempt, processes)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(per_epoch * t.epochs))
    every = max(1, total // 5)
    eval_every = t.eval_steps or every
    # keep_best picks among the evaluations: each needs its checkpoint to pick from.
    return total, eval_every, eval_every if t.keep_best else (t.save_steps or every)


def steps_per_epoch(cfg: RunConfig, n_rows: int, attempt: Attempt | None = None, processes: int | None = None) -> int:
    """Optimizer steps in one pass over `n_rows` rows: each of the run's `processes` (default: this worker's
    world) takes its own batch in every step."""
    t = cfg.training
    batch, accum = (attempt.batch_size, attempt.grad_accum) if attempt else (t.batch_size, t.grad_accum)
    processes = _processes() if processes is None else processes
    return max(1, math.ceil(n_rows / (batch * accum * processes)))


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
        # keep_best: the Trainer tracks the lowest held-out loss, and its checkpoint clean-up never deletes that
        # checkpoint (save_total_limit keeps it besides the latest); keep_best() loads it at the end.
        **(dict(metric_for_best_model="eval_loss", greater_is_better=False) if t.keep_best and has_eval else {}),
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
