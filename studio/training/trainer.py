"""Train one run: data -> model -> PEFT -> TRL SFTTrainer -> adapter on disk.

``train_run`` reads like the story it tells. It never raises to its caller for a user-fixable
problem: the run's status.json ends ``completed``, ``failed`` (with a message that says what to do)
or, when the process dies, stays ``running`` until the next start marks it ``interrupted``.
"""

from __future__ import annotations

import errno
import gc
import math
import os
import shutil
import threading
import traceback
from dataclasses import dataclass

from studio import models
from studio.config import RunConfig
from studio.data import Splits, load_splits
from studio.errors import StudioError
from studio.methods import peft_config_for, quantization_for
from studio.rendering import EncodedSet, encode_all
from studio.runs import Run, checkpoint_step
from studio.training.memory import ModelShape, head_dim_of
from studio.training.speed import SpeedPlan, plan_speed

OOM_HINT = ("Out of memory. Lower training.batch_size (and raise training.grad_accum to keep the same "
            "effective batch), lower data.max_length, or use QLoRA on an NVIDIA GPU. Saved checkpoints are intact.")


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
    speed: SpeedPlan


def prepare(cfg: RunConfig, run: Run | None = None) -> Prepared:
    """Load and check data first (cheap, most errors live there), then the model, then wrap it in PEFT."""
    import torch
    splits: Splits = load_splits(cfg.data, seed=cfg.training.seed)
    device = models.pick_device()
    dtype = models.pick_dtype(cfg.training.precision, device)
    quantization = quantization_for(cfg.method.method)
    if quantization and device != "cuda":
        models.bitsandbytes_config(quantization)  # raises the plain-language "needs an NVIDIA GPU" message
    location = models.resolve(cfg.model.name_or_path)
    tokenizer = models.load_tokenizer(cfg.model, location)
    train = encode_all(tokenizer, splits.train, cfg.data.max_length, cfg.data.train_on, cfg.data.too_long)
    evaluation = encode_all(tokenizer, splits.eval, cfg.data.max_length, cfg.data.train_on, cfg.data.too_long)
    if not train.rows:
        raise StudioError(f"No training rows are left after applying max_length={cfg.data.max_length} "
                          f"({train.summary()}). Raise data.max_length or shorten the prompts.")
    if run is not None:
        run.write_json("data.json", _data_summary(splits, train, evaluation))
    speed = plan_for(cfg, location, device)
    limit_memory(cfg, device)
    model = models.load_model(location, dtype=dtype, device=device, quantization=quantization,
                              attention=speed.attention)
    model = apply_method(model, cfg, quantization, speed, dtype)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    if run is not None:
        run.set_status("running", f"Model loaded; training with {speed.summary()}.", speed=speed.as_dict())
    return Prepared(cfg, tokenizer, model, train, evaluation, device, dtype, speed)


def plan_for(cfg: RunConfig, location: str, device: str) -> SpeedPlan:
    """The speed plan from the model's config alone (no weights read) and the GPU's free memory."""
    import torch
    from transformers import AutoConfig

    from studio.training import varlen_attention  # importing it registers its attention with transformers
    config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    free = torch.cuda.mem_get_info()[0] / 2**30 if device == "cuda" else None
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    dtype = models.pick_dtype(cfg.training.precision, device)
    varlen_ok = varlen_attention.supported(text, capability, dtype) \
        and varlen_attention.kernel_runs(head_dim_of(text), dtype)
    return plan_speed(cfg, device, getattr(text, "model_type", ""), ModelShape.from_config(text), free, varlen_ok)


def limit_memory(cfg: RunConfig, device: str) -> None:
    """Make training.memory_limit_gib binding: past it the allocator reports out of memory (and the
    out-of-memory retry takes over) instead of the run spreading into memory others need."""
    import torch
    if device != "cuda":
        return
    use_expandable_segments()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    limit = cfg.training.memory_limit_gib
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total) if limit else 1.0)


def use_expandable_segments() -> None:
    """Let the CUDA allocator grow its blocks in place instead of caching fixed-size ones. The planner fills
    most of the memory a run may use; with fixed blocks, the free memory ends up split among cached blocks of
    the wrong sizes, and near the limit the allocator frees its whole cache and retries (a device-wide
    synchronisation each time). A PYTORCH_CUDA_ALLOC_CONF that already says otherwise is left alone."""
    import torch
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")


def _data_summary(splits: Splits, train: EncodedSet, evaluation: EncodedSet) -> dict:
    lengths = sorted(train.lengths)
    report = splits.train_report
    return {"file": report.path, "format": report.format, "rows": report.total_rows, "usable": report.usable,
            "bad_rows": [{"row": b.row, "reason": b.reason} for b in report.bad_rows[:200]],
            "blank_rows": report.blank_rows, "train_rows": len(train.rows), "eval_rows": len(evaluation.rows),
            "truncated": train.truncated, "dropped_too_long": train.dropped_too_long,
            "dropped_nothing_to_learn": train.dropped_nothing_to_learn, "trained_tokens": train.trained_tokens,
            "length_min": lengths[0], "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1]}


def apply_method(model, cfg: RunConfig, quantization: str | None, speed: SpeedPlan, dtype=None):
    from peft import get_peft_model
    if speed.gradient_checkpointing:  # every method, full fine-tuning included (the Trainer's switch is off)
        enable_checkpointing(model, speed.uncheckpointed_layers)
    if speed.fused_norm:
        from studio.training.kernels import use_fused_rms_norm
        use_fused_rms_norm(model)
    peft_config = peft_config_for(cfg.method, models.linear_layer_names(model))
    if peft_config is None:
        return model  # full fine-tuning trains the model itself
    if quantization:
        # What PEFT's prepare_model_for_kbit_training does, minus upcasting embeddings and the LM head to
        # float32 (4 GB more on an 8B model with a 128k vocabulary, for no accuracy we could measure).
        for param in model.parameters():
            param.requires_grad_(False)
    model = get_peft_model(model, peft_config)
    if dtype is not None and str(dtype) in ("torch.bfloat16", "torch.float16"):
        # PEFT keeps adapter weights in float32 (right for the optimizer) and casts every input activation
        # to float32 to match them: on the 1B shape that was ~19% of GPU time in copies (bench/NOTES.md).
        # Training runs under autocast, which does the adapter matmuls in 16-bit anyway, so skip the cast.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if speed.fused_lora:
        from studio.training.fused_lora import fuse_lora_layers
        fuse_lora_layers(model)
    return model


def enable_checkpointing(model, uncheckpointed_layers: int = 0) -> int:
    """Checkpoint the model's decoder layers except the last `uncheckpointed_layers`; returns how many are
    checkpointed. The last ones keep their activations because the backward reaches them first: their
    memory is freed before any checkpointed layer is recomputed. Non-reentrant checkpointing needs no
    gradient on the embeddings' output, so transformers' hook that forces one (a full input-gradient
    pass through the first layer) is taken off again."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    # The check that the recompute saved tensors of the same shapes is off: fused 4-bit LoRA saves the packed
    # weight in the forward and, on purpose, the dequantised one in the recompute (fused_lora._recomputing).
    kwargs = {"use_reentrant": False, "determinism_check": "none"}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = min(max(0, uncheckpointed_layers), len(layers))
    for layer in layers[len(layers) - keep:] if keep else []:
        layer.gradient_checkpointing = False
    return len(layers) - keep


def steps_plan(cfg: RunConfig, n_rows: int) -> tuple[int, int, int]:
    """(total optimizer steps, eval every, save every) with 'about five times per run' defaults."""
    t = cfg.training
    per_epoch = max(1, math.ceil(n_rows / (t.batch_size * t.grad_accum)))
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(per_epoch * t.epochs))
    every = max(1, total // 5)
    return total, t.eval_steps or every, t.save_steps or every


def build_trainer(prep: Prepared, run: Run, callbacks: list):
    import datasets
    from trl import SFTConfig

    from studio.training.sft_trainer import StudioSFTTrainer
    cfg, t = prep.cfg, prep.cfg.training
    _, eval_every, save_every = steps_plan(cfg, len(prep.train.rows))
    has_eval = bool(prep.eval.rows)
    bf16 = prep.dtype is not None and str(prep.dtype) == "torch.bfloat16"
    fp16 = prep.dtype is not None and str(prep.dtype) == "torch.float16"
    args = SFTConfig(
        output_dir=str(run.checkpoints_dir), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, lr_scheduler_type=t.scheduler,
        logging_steps=t.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=eval_every,
        save_strategy="steps", save_steps=save_every, save_total_limit=2, seed=t.seed, data_seed=t.seed,
        # Checkpointing is already set up layer by layer (apply_method); the Trainer's switch would turn it
        # on for every layer.
        bf16=bf16, fp16=fp16, gradient_checkpointing=False, use_liger_kernel=prep.speed.liger,
        max_length=cfg.data.max_length, packing=prep.speed.packing, packing_strategy="bfd",
        # Flex attention is compiled for fixed shapes: pad each packed batch to one length (bins are nearly
        # full, so little is wasted) instead of recompiling for every new total length.
        pad_to_multiple_of=t.batch_size * cfg.data.max_length
        if prep.speed.packing and prep.speed.attention == "flex_attention" else None,
        report_to="none", disable_tqdm=True,
        # StudioSFTTrainer counts the tokens seen on the host; the Trainer's own count waits on the GPU.
        include_num_input_tokens_seen="no", dataloader_num_workers=prep.speed.data_workers,
        use_cpu=prep.device == "cpu",
        # Batches come from pinned memory and are copied to the GPU without waiting: a plain copy makes the host
        # wait for the GPU to finish the previous step first (bench/syncs.py: 6 waits a step before this).
        dataloader_pin_memory=prep.device == "cuda", accelerator_config={"non_blocking": prep.device == "cuda"},
        save_only_model=False, logging_first_step=True,
        logging_nan_inf_filter=False)  # the default filter hides NaN losses from the logs, and so from our guard
    train_ds = datasets.Dataset.from_list(prep.train.rows)
    eval_ds = datasets.Dataset.from_list(prep.eval.rows) if has_eval else None
    from transformers.trainer_callback import PrinterCallback
    datasets.disable_progress_bars()
    from studio.training.callbacks import FreezeSetupObjects
    trainer = StudioSFTTrainer(model=prep.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=prep.tokenizer, callbacks=[*callbacks, FreezeSetupObjects()])
    trainer.remove_callback(PrinterCallback)  # progress goes to metrics.jsonl; the CLI and UI show it
    return trainer


def save_result(prep: Prepared, trainer, run: Run) -> None:
    """Write the adapter (or full model) plus tokenizer to adapter/, replacing any older one whole."""
    tmp = run.path / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    prep.tokenizer.save_pretrained(str(tmp))  # the chat template used in training travels with the adapter
    shutil.rmtree(run.adapter_dir, ignore_errors=True)
    os.replace(tmp, run.adapter_dir)


MAX_OOM_RETRIES = 3


def train_run(run: Run, stop_event: threading.Event | None = None, resume: bool = False) -> dict:
    """Train (or resume) a run to the end; return its final status. Never raises for user errors.

    Out of memory with training.oom_retry on: halve the micro-batch, double gradient accumulation (the
    same effective batch, so the step count and the schedule stay as planned) and continue from the
    last complete checkpoint, up to three times.
    """
    stop_event = stop_event or threading.Event()
    status = _train_once(run, stop_event, resume)
    for _ in range(MAX_OOM_RETRIES):
        cfg = run.config()
        if not status.get("oom") or not cfg.training.oom_retry or cfg.training.batch_size == 1 or stop_event.is_set():
            break
        cfg.training.batch_size //= 2
        cfg.training.grad_accum *= 2
        run.write_config(cfg)
        note = (f"Ran out of memory; retrying automatically with batch size {cfg.training.batch_size} and gradient "
                f"accumulation {cfg.training.grad_accum}.")
        run.set_status("running", note, oom=False, retried=note)
        resume = run.last_checkpoint() is not None
        if not resume:
            run.truncate_metrics_after(0)
        status = _train_once(run, stop_event, resume)
    return status


def _train_once(run: Run, stop_event: threading.Event, resume: bool) -> dict:
    from studio.training.callbacks import MarkCompleteCheckpoints, NonFiniteLossGuard, RunLogger, StopOnRequest
    prep = trainer = None
    try:
        cfg = run.config()
        run.set_status("running", "Loading data and model.", error="", stopped_early=False)
        prep = prepare(cfg, run)
        checkpoint = run.last_checkpoint() if resume else None
        if resume and checkpoint is None:
            raise StudioError(f"Run {run.id} has no complete checkpoint to resume from. Start it again instead.")
        elapsed_before = 0.0
        if checkpoint is not None:
            step = checkpoint_step(checkpoint)
            earlier = [m for m in run.metrics() if m.get("step", 0) <= step]
            elapsed_before = earlier[-1]["elapsed_s"] if earlier else 0.0
            run.truncate_metrics_after(step)
        stopper, guard = StopOnRequest(stop_event, run), NonFiniteLossGuard()
        trainer = build_trainer(prep, run, [RunLogger(run, elapsed_before), stopper, guard,
                                            MarkCompleteCheckpoints(run)])
        if stop_event.is_set():
            return run.set_status("completed", "Stopped before the first step; nothing was trained.",
                                  stopped_early=True)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if guard.bad_step is not None:
            return run.set_status(
                "failed", f"The loss became NaN or infinite at step {guard.bad_step}, so training stopped. Lower "
                "training.learning_rate (e.g. by 10x) and start again. This adapter is not saved, merged or exported.",
                error="non-finite loss")
        save_result(prep, trainer, run)
        step = trainer.state.global_step
        if stopper.stopped_at is not None:
            return run.set_status("completed", f"Stopped by you at step {step}; the adapter from that step is saved.",
                                  stopped_early=True, step=step)
        return run.set_status("completed", f"Finished {step} steps; the adapter is saved.", step=step)
    except StudioError as err:
        return run.set_status("failed", str(err), error=str(err))
    except Exception as err:  # noqa: BLE001 - the run must end in a readable state whatever happened
        if _is_out_of_memory(err):
            return run.set_status("failed", OOM_HINT, error="out of memory", oom=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return run.set_status("failed", "The disk is full, so saving failed. Free some space, then resume: "
                                  "earlier checkpoints are intact.", error="disk full")
        (run.path / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        return run.set_status("failed", f"Training failed: {type(err).__name__}: {err}. The full error is in "
                              f"{run.path / 'error.log'}.", error=f"{type(err).__name__}: {err}")
    finally:
        del prep, trainer
        release_memory()


def _is_out_of_memory(err: BaseException) -> bool:
    import torch
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory() -> None:
    import torch
    gc.unfreeze()  # a run that failed mid-training left its objects frozen (FreezeSetupObjects)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # training.memory_limit_gib binds the run, not the process: the chat tab's model loads after it.
        torch.cuda.set_per_process_memory_fraction(1.0)

