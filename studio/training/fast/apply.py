"""The one place a speed plan acts. Each function is called at one moment of setting a run up, and does what
the plan says for that moment and nothing else; with a plain plan (``training.speed: plain``) each one
leaves stock TRL and PEFT behaviour untouched.

  before_model_load(plan)          the attention kernel's registration, the GPU's memory limit and allocator
  model_load_options(plan)         arguments for from_pretrained (the attention implementation)
  adapt_base_model(model, plan)    per-layer checkpointing (offloaded where planned), the input embeddings in
                                   host memory (where planned), the fused RMSNorm: before PEFT wraps the model
  prepare_quantized(model, plan)   what 4-bit and 8-bit bases need before PEFT wraps them
  adapt_peft_model(model, plan)    the fused LoRA path, LoRA inputs kept in 16-bit
  trainer_options(plan, ...)       TRL/Trainer arguments: packing, Liger, data workers, pinned batches
  trainer_class(plan) / trainer_callbacks(plan)   (the LoRA MLP kernel and the MLP in tiles, once the trainer has
                                   put Liger's MLP in place)
  finish(plan)                     undo what binds the process (collector freeze), for in-process callers
"""

from __future__ import annotations

import gc
import os

from studio.training.fast.plan import UNMASKED_STAGES, VARLEN_ATTENTION, SpeedPlan


def before_model_load(plan: SpeedPlan, device: str) -> None:
    if plan.attention == VARLEN_ATTENTION:
        from studio.training.fast import varlen_attention
        varlen_attention.register(0 if plan.plain else plan.long_rows_cudnn,
                                  flash4=plan.flash_attention_4 and not plan.plain)
    if device != "cuda" or plan.plain:
        return
    if plan.liger:
        _liger_triton_kernels()
    import torch
    _use_expandable_segments()
    # training.memory_limit_gib is binding: past it the allocator reports out of memory (and the out-of-memory
    # retry takes over) instead of the run spreading into memory others need. The worker is its own process,
    # so the limit ends with the run.
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    limit = plan.memory_limit_gib
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total) if limit else 1.0)


def _use_expandable_segments() -> None:
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


def model_load_options(plan: SpeedPlan) -> dict:
    return {"attention": plan.attention}


def adapt_base_model(model, plan: SpeedPlan) -> None:
    if plan.plain:
        return  # checkpointing, when asked for, is the Trainer's own switch (trainer_options)
    if plan.gradient_checkpointing:  # every method, full fine-tuning included (the Trainer's switch is off)
        checkpoint_layers(model, plan.uncheckpointed_layers)
        if plan.offloaded_layers:
            from transformers.modeling_layers import GradientCheckpointingLayer

            from studio.training.fast.activations import offload_checkpoints
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            # With method.last_layers the plan counts the offloaded layers among the adapted ones: the frozen layers
            # beneath keep nothing for the backward.
            adapted = layers[-plan.adapted_layers:] if plan.adapted_layers else layers
            offload_checkpoints(adapted, plan.offloaded_layers)
    if plan.host_embeddings:
        from studio.training.fast.host_embeddings import embeddings_to_host
        embeddings_to_host(model)
    if plan.fused_norm:
        from studio.training.fast.kernels import use_fused_rms_norm
        use_fused_rms_norm(model)


def checkpoint_layers(model, uncheckpointed_layers: int = 0) -> int:
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


def prepare_quantized(model, plan: SpeedPlan):
    """Freeze a 4-bit or 8-bit base before PEFT adds its adapters."""
    if plan.plain:
        from peft import prepare_model_for_kbit_training
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    # What PEFT's prepare_model_for_kbit_training does, minus upcasting embeddings and the LM head to float32
    # (4 GB more on an 8B model with a 128k vocabulary, for no accuracy we could measure).
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def adapt_peft_model(model, plan: SpeedPlan, dtype=None) -> None:
    if plan.plain:
        return
    if dtype is not None and str(dtype) in ("torch.bfloat16", "torch.float16"):
        # PEFT keeps adapter weights in float32 (right for the optimizer) and casts every input activation to
        # float32 to match them, a copy of every activation. Training runs under autocast, which does the
        # adapter matmuls in 16-bit anyway, so the cast is skipped.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if plan.fused_lora:
        from studio.training.fast.fused_lora import fuse_lora_layers
        fuse_lora_layers(model, pack_4bit=plan.pack_4bit_siblings)
    if plan.gradient_checkpointing:
        # PEFT puts back the hook checkpoint_layers took off (it adds it to any unquantized model that
        # checkpoints): the input embeddings' output then needs a gradient, so the backward goes on below the
        # lowest adapted layer, an input-gradient pass through the first layer that nothing uses, and with
        # method.last_layers the whole backward (and recomputation) of the frozen layers beneath.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()


def padding_free(plan: SpeedPlan, stage: str) -> bool:
    """Whether `stage`'s padded batches run on their real tokens only (padding_free.py): where its rows are padded
    on the right from position 0 and the plan picked the variable-length kernel, which keeps sequences apart."""
    return stage in UNMASKED_STAGES and plan.attention == VARLEN_ATTENTION and not plan.plain


def adapt_for_stage(model, plan: SpeedPlan, stage: str) -> None:
    """What the plan changes on a model for a stage other than supervised fine-tuning, once it has its adapters."""
    if padding_free(plan, stage):
        from studio.training.fast.padding_free import run_on_real_tokens
        run_on_real_tokens(model)


def _liger_triton_kernels() -> None:
    """Keep Liger on its Triton kernels, the ones the plan was measured with. Newer Liger prefers kernels written in
    CuTe's Python DSL wherever that DSL imports, and FlashAttention-4 brings the DSL along: on the H200 the 8B LoRA
    step then ran a quarter slower and the host-bound QLoRA step half as fast (bench/NOTES.md, session 17)."""
    import importlib
    try:  # (the package's `dispatch` attribute is a function of that module, not the module)
        dispatch = importlib.import_module("liger_kernel.backends.dispatch")
    except ImportError:  # a Liger with Triton kernels only
        return
    dispatch.set_impl("triton")


def trainer_options(plan: SpeedPlan, device: str, batch_size: int, max_length: int, stage: str = "sft",
                    passes: float = 1.0) -> dict:
    """Arguments for TRL's config (SFTConfig and its siblings) that the plan decides. Packing and the studio's
    own token count belong to supervised fine-tuning; the other stages get what every Trainer takes. `passes`:
    how many times the run goes over its training rows."""
    options = {"use_liger_kernel": plan.liger, "dataloader_num_workers": plan.data_workers,
               "use_cpu": device == "cpu", **parallel_options(plan)}
    if stage == "sft":
        options["packing"] = plan.packing
    if plan.plain:
        options["gradient_checkpointing"] = plan.gradient_checkpointing
        options["include_num_input_tokens_seen"] = "non_padding"  # for the tokens/s shown; it waits on the GPU
        return options
    # Checkpointing is set up layer by layer (adapt_base_model); the Trainer's switch would turn it on for all.
    options["gradient_checkpointing"] = False
    if plan.packing:
        options["packing_strategy"] = "bfd"
        if plan.attention == "flex_attention":
            # Flex attention is compiled for fixed shapes: pad each packed batch to one length (bins are nearly
            # full, so little is wasted) instead of recompiling for every new total length.
            options["pad_to_multiple_of"] = batch_size * max_length
    if stage in ("dpo", "kto"):
        # The reference (the start, adapter off) never changes: its log-probabilities can be worked out once for
        # every row before training instead of in every step. That costs the same forward once per row, plus a
        # hash of the whole model that TRL names its cache by, so it pays only when the run sees its rows more than
        # once (bench/NOTES.md: from the second epoch on); a short run over part of its data computes the
        # reference for just the rows it trains on.
        options["precompute_ref_log_probs"] = passes >= 2
    # The studio's trainer counts the tokens seen on the host; the Trainer's own count waits on the GPU. TRL's
    # other trainers count them themselves where they can. GRPO's batches are prompts the Trainer cannot count (it
    # warns at every step); GRPO's trainer counts prompt and reply tokens itself.
    options["include_num_input_tokens_seen"] = "no" if stage in ("sft", "grpo") else "non_padding"
    # Batches come from pinned memory and are copied to the GPU without waiting: a plain copy makes the host
    # wait for the GPU to finish the previous step first.
    options["dataloader_pin_memory"] = device == "cuda"
    options["accelerator_config"] = {"non_blocking": device == "cuda"}
    return options


def parallel_options(plan: SpeedPlan) -> dict:
    """The Trainer's DDP or FSDP2 arguments for a run of several processes (none for one)."""
    if plan.processes <= 1:
        return {}
    if plan.strategy == "fsdp":
        # FSDP2, every decoder layer its own unit (accelerate takes the layer class from the model's
        # _no_split_modules); weights are gathered for a layer's forward and let go after it.
        return {"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                   "state_dict_type": "SHARDED_STATE_DICT"}}
    # Every trainable weight takes part in every step, so DDP need not search the graph for unused ones.
    return {"ddp_find_unused_parameters": False}


def distribute(trainer, plan: SpeedPlan) -> None:
    """After the trainer is built, before it prepares the model: FSDP2 for CPU processes too. Accelerate offers
    FSDP only on accelerators and trains CPU processes with DDP; PyTorch's FSDP2 itself runs on CPU processes
    over gloo, so the state accelerate would have set for GPUs is set here, and the same FSDP2 path is what a
    run on CPU processes (and the tests) exercise."""
    if plan.strategy != "fsdp" or plan.processes <= 1:
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    state = trainer.accelerator.state
    if state.distributed_type is DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        trainer.is_fsdp_enabled = True
    if getattr(state, "fsdp_plugin", None) is None:
        raise RuntimeError("FSDP2 was planned but the trainer did not set it up.")


def trainer_class(plan: SpeedPlan):
    if plan.studio_trainer and not plan.plain:
        from studio.training.fast.sft_trainer import StudioSFTTrainer
        if plan.head_keeps_logits:
            return type("StudioSFTTrainer", (StudioSFTTrainer,), {"head_keeps_logits": True})
        return StudioSFTTrainer
    from trl import SFTTrainer
    return SFTTrainer


def trainer_callbacks(plan: SpeedPlan) -> list:
    if plan.plain:
        return []
    from studio.training.fast.sft_trainer import FreezeSetupObjects
    callbacks = [FreezeSetupObjects()]
    if plan.fused_lora_mlp or plan.mlp_tile_tokens:
        from transformers import TrainerCallback

        class PrepareMLPs(TrainerCallback):
            """At the start of training: the trainer has put Liger's MLP forward in place by then. The LoRA MLP path
            replaces it (keeping it for the calls it does not cover), then the tiles wrap whichever forward the MLP
            has."""

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if plan.fused_lora_mlp:
                    from studio.training.fast.lora_mlp import fuse_lora_mlps
                    fuse_lora_mlps(model)
                if plan.mlp_tile_tokens:
                    from studio.training.fast.activations import tile_mlps
                    tile_mlps(model, plan.mlp_tile_tokens)

        callbacks.append(PrepareMLPs())
    return callbacks


def finish(plan: SpeedPlan) -> None:
    """After a run in this process ends, however it ended: a failed run left its objects frozen, and offloaded
    checkpoints' pinned host memory is given back."""
    if not plan.plain:
        gc.unfreeze()
    if plan.offloaded_layers:
        from studio.training.fast.activations import release_host_buffers
        release_host_buffers()
