"""TRL's SFTTrainer without the waits on the GPU that its per-step bookkeeping costs.

After every forward, SFTTrainer.compute_loss turns the token entropy and accuracy into Python floats (two
`.item()` calls and a `num_valid > 0` test), and after every backward the Trainer counts the tokens seen with
another `.item()`. Each of these makes the host wait until the GPU has finished everything issued so far, and
then the GPU waits while the host issues the next work. Where the host is the bottleneck (QLoRA, small
models) the GPU idles at every one of them.

Here the two metrics stay on the GPU as running sums and become floats only on a step that logs, and the
tokens are counted on the host, where the batch is put together (the collator runs in the data-loader
workers). The loss is TRL's own: the same fused LM head, the same normalisation. Anything other than plain
training with TRL's default loss (evaluation, a custom or label-smoothed loss, MoE auxiliary losses,
sequence parallelism) goes through TRL's compute_loss unchanged.

The Trainer also walks every module or parameter of the model three times a step: `model.train()`, the
parameter count for its FLOP estimate, and `model.parameters()` for gradient clipping. A LoRA model of 32
layers has thousands of modules, and where the host is the bottleneck every walk costs the GPU time
(bench/NOTES.md has the profile). Here the count and the trainable parameters are found once, and
`model.train()` walks the model only when it is not already in training mode.

TRL's fused head projects only the positions that have a label where Triton runs (a GPU); elsewhere it projects
every position, padding and prompts included, so that a compiler sees one tile shape. Nothing compiles the CPU's
steps, so this trainer has it project only the labelled positions there too: the same loss and gradients, and on
the CPU demo about 15% less time a step (bench/NOTES.md, session 11).

Where the plan says the logits fit (plan.head_keeps_logits), the head inside TRL's fused forward is the studio's
own (lm_head.py), which keeps the logits for the backward instead of projecting them a second time.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

TOKEN_COUNT = "studio_real_tokens"  # the collator's count of real (non-padding) tokens in a batch


def _fused_head_has_fields() -> bool:
    """Whether this TRL's fused LM head returns what the loss and metrics below read (written against TRL 1.16).
    If a later TRL changes it, every step takes TRL's own compute_loss instead: slower, never wrong."""
    import dataclasses
    try:
        from trl.trainer.utils import FusedCausalLMOutput
        names = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    except (ImportError, TypeError):
        return False
    return {"log_probs", "entropy", "is_top1", "label_mask"} <= names


_FUSED_HEAD_FIELDS = _fused_head_has_fields()


@contextmanager
def _trl_name_replaced(name: str, replacement):
    """trl.trainer.utils.<name> (a module-level name read only by TRL's fused forward) replaced by
    `replacement(original)` for one call and put back afterwards; a TRL without that name is left to itself."""
    import trl.trainer.utils as trl_utils
    original = getattr(trl_utils, name, None)
    if original is None:
        yield
        return
    setattr(trl_utils, name, replacement(original))
    try:
        yield
    finally:
        setattr(trl_utils, name, original)


def _head_on_labelled_positions_only():
    """TRL's fused head, told it may gather the labelled positions before projecting, as it does on GPUs (see the
    module docstring): TRL's choice is its `_use_triton` test."""
    return _trl_name_replaced("_use_triton", lambda original: lambda device: True)


def _head_keeping_logits(keep: bool):
    """Inside TRL's fused head, the studio's head that keeps its logits for the backward (lm_head.py) in place of
    TRL's chunked function `_ChunkedLogProbFunction`; TRL's own where `keep` is off."""
    if not keep:
        return nullcontext()
    from studio.training.fast.lm_head import TRLHeadWithKeptLogits
    return _trl_name_replaced("_ChunkedLogProbFunction", TRLHeadWithKeptLogits)


class CountRealTokens:
    """Wraps a collator: adds the number of real tokens of the batch as a plain int (no GPU involved).
    Padding the collator adds (padded rows, a packed row padded to a fixed length) is not counted."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[TOKEN_COUNT] = sum(len(example["input_ids"]) for example in examples)
        return batch


class StudioSFTTrainer(SFTTrainer):
    """SFTTrainer whose training steps never wait on the GPU for metrics (see the module docstring).
    Build it with `include_num_input_tokens_seen="no"`: it keeps `state.num_input_tokens_seen` itself."""

    head_keeps_logits = False  # plan.head_keeps_logits: apply.trainer_class makes a subclass that sets it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = CountRealTokens(self.data_collator)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._parameter_count: int | None = None
        self._trainable: list | None = None
        self._walked_into_training = None  # the model whose every module the last full train() reached
        self._tokens_not_summed = 0  # this process's tokens since the last log, not yet added up across processes

    def training_step(self, model, inputs, num_items_in_batch=None):
        if model.training and self.model.training and self._walked_into_training is model:
            # Every module is in training mode since the last full walk; evaluation puts the top module in
            # eval mode (model.training is then False), so the step after it walks again. Under DDP `model` is
            # the wrapper, which evaluation leaves alone: the model inside says whether it was put in eval mode.
            with _train_call_skipped(model):
                return super().training_step(model, inputs, num_items_in_batch)
        self._walked_into_training = model
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x tokens x parameters without embeddings), with the parameters counted once
        instead of on every micro-batch."""
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if ids is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * ids.numel() * self._parameter_count

    def _clip_grad_norm(self, model):
        """The Trainer's clipping over the trainable parameters, listed once (the model's set does not change
        during training). Anything but one plain process keeps the Trainer's own path."""
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type != DistributedType.NO or self.args.max_grad_norm is None:
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real_tokens = inputs.pop(TOKEN_COUNT, None)
        training = self.model.training
        if training and real_tokens is not None:
            self.state.num_input_tokens_seen += real_tokens
            self._tokens_not_summed += real_tokens
        if not (training and real_tokens is not None and not return_outputs and self._plain_loss()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._total_train_tokens += real_tokens
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        inputs["use_cache"] = False
        with _head_on_labelled_positions_only(), _head_keeping_logits(self.head_keeps_logits):
            outputs = model(**inputs, fused_lm_head=True)
        valid = outputs.label_mask.sum()
        count = valid if num_items_in_batch is None else num_items_in_batch
        # TRL's normalisation: per-token log-probabilities are zero on ignored positions.
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._add_metrics(valid, entropy=outputs.entropy.detach().sum(), mean_token_accuracy=outputs.is_top1.sum())
        return loss

    def _plain_loss(self) -> bool:
        """True when TRL's compute_loss would take its plain path: fused LM head, negative log-likelihood."""
        parallel = getattr(self.accelerator, "parallelism_config", None)
        return (_FUSED_HEAD_FIELDS and self.compute_loss_func is None and self.label_smoother is None
                and self.args.loss_type == "nll" and not self.aux_loss_enabled
                and not (parallel is not None and getattr(parallel, "sp_enabled", False)))

    def _add_metrics(self, valid: torch.Tensor, **sums: torch.Tensor) -> None:
        """Add this micro-batch's per-token means to running sums on the GPU; no host wait. A micro-batch
        without trainable tokens counts as 0, as in TRL."""
        for name, total in sums.items():
            mean = torch.where(valid > 0, total / valid.clamp(min=1), 0.0).float()
            kept = self._metric_sums.get(name)
            self._metric_sums[name] = mean if kept is None else kept.add_(mean)
        self._metric_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.accelerator.num_processes > 1:
            # The count is every process's tokens: the others' are added here, once per log, not in every step.
            from studio.distributed import total
            mine, self._tokens_not_summed = self._tokens_not_summed, 0
            self.state.num_input_tokens_seen += int(total(mine)) - mine
        if self._metric_count and self.model.training:
            # One wait for all of them, on a logging step. TRL averages what its lists hold.
            names = list(self._metric_sums)
            values = torch.stack([self._metric_sums[n] for n in names]).tolist()
            for name, value in zip(names, values):
                self._metrics["train"][name].append(value / self._metric_count)
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, start_time)


@contextmanager
def _train_call_skipped(model):
    """`model.train()` returns at once inside this block (an instance attribute hides the method)."""
    model.train = lambda mode=True: model
    try:
        yield
    finally:
        del model.train


class FreezeSetupObjects(TrainerCallback):
    """Keep Python's garbage collector off the objects built before training (the model's modules and
    parameters, the trainer, the data). Each full collection walks all of them, and training creates
    objects fast enough that collections run every step (bench/NOTES.md has the measurement). The GPU waits for the host through all of it
    whenever training is bound by the host (QLoRA). Unfrozen when training ends (and by apply.finish when
    it fails), so the run's objects can be collected afterwards."""

    def on_train_begin(self, args, state, control, **kwargs):
        gc.collect()
        gc.freeze()

    def on_train_end(self, args, state, control, **kwargs):
        gc.unfreeze()
