"""Trainer callbacks that connect a training loop to its run folder and to the Stop button."""

from __future__ import annotations

import contextlib
import json
import math
import sys
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


# --- sample replies: the same prompts answered as training goes ---
SAMPLE_NEW_TOKENS = 48  # short replies: enough to see a habit change, cheap on a CPU (about a second per evaluation)
SAMPLE_CHARS = 2000  # the page shows these on every refresh; longer prompts are cut for display
# Attention kernels that train on packed rows but cannot decode with a key/value cache (varlen_attention.py) or
# recompile for every new length (flex): the sample replies are written with PyTorch's SDPA instead.
TRAINING_ONLY_ATTENTION = ("packed_varlen", "flex_attention")


class SampleReplies(TrainerCallback):
    """Answer a fixed set of prompts (`conversations`, each a list of turns ending with a user turn, or a row
    {"messages": ..., "tools": ...} whose tools the chat template is given) before the first step (the
    starting model: step 0) and at every evaluation, appending {"step", "prompt", "reply"} rows to samples.jsonl,
    so a person sees the replies change, not only a loss.

    Every process of a run answers (under FSDP2 each forward needs every process's share of the weights); only
    the one keeping the records writes. Decoding is greedy, so the same run writes the same replies."""

    def __init__(self, run: Run, tokenizer, conversations: list[list[dict]], max_length: int,
                 max_new_tokens: int = SAMPLE_NEW_TOKENS):
        self.run = run
        self.tokenizer = tokenizer
        self.conversations = conversations
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.turned_off = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A resumed run (past step 0) wrote its starting model's replies in its first session.
        if state.global_step == 0:
            self._record(model, 0, base=True, precision=_mixed_precision(args))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._record(model, state.global_step, base=False, precision=_mixed_precision(args))

    def _record(self, model, step: int, base: bool, precision=None) -> None:
        if self.turned_off or model is None or not self.conversations:
            return
        try:
            replies = self.answer(model, base, precision)
        except Exception as err:  # noqa: BLE001 - a sample that cannot be written must not end the training
            from studio.training.loop import is_out_of_memory
            if is_out_of_memory(err):
                raise  # the run's out-of-memory retry handles it
            self.turned_off = True
            print(f"Sample replies turned off for this run: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return
        if not self.run.keeps_records:
            return
        with open(self.run.path / "samples.jsonl", "a", encoding="utf-8") as fh:
            for conversation, reply in zip(self.conversations, replies):
                row = {"step": step, "prompt": prompt_text(conversation)[:SAMPLE_CHARS], "reply": reply[:SAMPLE_CHARS]}
                fh.write(json.dumps(row) + "\n")

    def answer(self, model, base: bool = False, precision=None) -> list[str]:
        """Greedy replies of `model` (with its adapter switched off when `base`) to every conversation, under
        autocast to `precision` when training mixes precisions (16-bit base weights and 32-bit adapters meet only
        under autocast). The model is back in the mode it was in afterwards, and the random number generators
        training draws from are as they were: greedy decoding draws nothing, and the state is saved and restored
        around it all the same, in case some layer draws in evaluation mode."""
        import torch

        from studio.rendering import reply_prompt, stop_token_ids
        tok = self.tokenizer
        texts = [reply_prompt(tok, c) for c in self.conversations]
        was_training = model.training
        sides = tok.padding_side, tok.truncation_side
        # Left padding: every row continues from its own last token; a prompt too long keeps its end (the question).
        tok.padding_side = tok.truncation_side = "left"
        try:
            # no_grad, not inference_mode: the fused LoRA path keeps casts of the adapter weights that training reuses,
            # and a tensor made in inference mode could not be used by training afterwards.
            device = _device_of(model)
            with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad(), _adapter_off(model, base), \
                    _decoding_attention(model), _autocast(device, precision):
                model.eval()
                inputs = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                             add_special_tokens=False).to(device)
                out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id,
                                     synced_gpus=_several_processes(), use_cache=True)
        finally:
            tok.padding_side, tok.truncation_side = sides
            model.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]


def prompt_text(conversation: list[dict] | dict) -> str:
    """What a sample's prompt column shows: the last thing the user said."""
    if isinstance(conversation, dict):  # a row with its tools
        conversation = conversation["messages"]
    return next((str(m.get("content", "")) for m in reversed(conversation) if m.get("role") == "user"), "")


def _mixed_precision(args):
    """The 16-bit type the Trainer computes in under autocast (TrainingArguments' bf16/fp16), or None."""
    import torch
    return torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None


def _autocast(device, precision):
    import torch
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision)


def _cuda_devices() -> list[int]:
    import torch
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _several_processes() -> bool:
    """Whether other processes decode alongside this one: each keeps stepping until all have finished, since
    under FSDP2 every step of any of them needs all of them."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device_of(model):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _adapter_off(model, base: bool):
    """The starting model: PEFT's adapters switched off for the replies (for full fine-tuning, the model before
    its first step is the start itself)."""
    if base and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _decoding_attention(model):
    """PyTorch's SDPA attention while the replies are written, where training uses a kernel that cannot decode.
    The config's attribute is what every attention layer and the mask builder read at each forward; setting it
    back is a plain assignment that cannot fail, so training never goes on with the wrong attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    training_kernel = getattr(config, "_attn_implementation", None)
    if training_kernel not in TRAINING_ONLY_ATTENTION:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = training_kernel


# --- overfitting guards ---
class StopWhenHeldOutLossStalls(TrainerCallback):
    """Early stopping: end training once the held-out loss has not improved on its best for `patience`
    evaluations in a row. Counted from the trainer's own log history, which a resumed run gets back from its
    checkpoint, so a resume keeps counting where it left off."""

    def __init__(self, patience: int):
        self.patience = patience
        self.stopped_at: int | None = None
        self.best_step = 0
        self.best_loss: float | None = None

    def on_evaluate(self, args, state, control, **kwargs):
        from studio.distributed import agree_any
        stalled, best = evaluations_since_best(state.log_history)
        # Every process computes the same held-out loss; agreeing still keeps them on one step if one did not.
        (stop,) = agree_any(stalled >= self.patience)
        if stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.best_step, self.best_loss = best if best else (0, None)
        return control


def evaluations_since_best(log_history: list[dict]) -> tuple[int, tuple[int, float] | None]:
    """(evaluations since the lowest held-out loss so far, (its step, its loss)); a loss that is not a finite
    number never counts as an improvement."""
    evaluations = [(h.get("step", 0), h["eval_loss"]) for h in log_history if "eval_loss" in h]
    best, since = None, 0
    for step, loss in evaluations:
        if isinstance(loss, (int, float)) and math.isfinite(loss) and (best is None or loss < best[1]):
            best, since = (step, float(loss)), 0
        else:
            since += 1
    return since, best


def tensorboard_callback(run: Run):
    """The Trainer's TensorBoard writer logging into the run's tensorboard/ folder, when the tensorboard package
    is installed (else None: nothing changes). Only the process that keeps the run's records writes."""
    if not run.keeps_records:
        return None
    try:
        from transformers.integrations import TensorBoardCallback
        from transformers.integrations.integration_utils import is_tensorboard_available
        if not is_tensorboard_available():
            return None
        callback = TensorBoardCallback()
    except (ImportError, RuntimeError):  # e.g. tensorboardX half installed: train without it
        return None
    callback.logging_dir = str(run.path / "tensorboard")  # read when training begins (it defaults to output_dir)
    return callback
