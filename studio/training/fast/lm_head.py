"""The LM head of supervised fine-tuning, keeping its 16-bit logits for the backward where memory allows.

TRL's fused head projects the labelled positions through the LM head in tiles and never holds the whole
[tokens x vocabulary] logits; its backward projects every tile a second time to turn it into the logits' gradient.
On a card with room that second projection is a third of the head's matmuls done only to save memory. This head
projects once and keeps the logits (2 bytes a token and vocabulary entry: 2 GiB for 8,192 tokens of a 128k
vocabulary); the planner turns it on only where that fits (plan.head_keeps_logits).

Each row of the kept logits is read once in the forward, by one kernel that keeps a running maximum, the sum of
exponentials and the sum of exponential x (logit - maximum), and so gives the log-probability of the label, the
entropy, and whether the label is the most likely token (the first of equal maxima, as TRL counts it). The backward
is one more pass per row that writes the logits' gradient over the logits themselves, followed by one matmul back
to the hidden states (and the weight's and bias's gradients when they train). The logits are the 16-bit product with
the bias added after it, as in TRL's head, so both heads round them alike. With triton's interpreter
(TRITON_INTERPRET=1) the same kernels run on the CPU, which is how the tests check them on machines without a GPU;
elsewhere without Triton the same arithmetic runs as PyTorch operations, a bounded tile of rows at a time.

The entropy and the top-1 flag are metrics: they carry no gradient here (the studio's SFT loss reads only the
log-probabilities).
"""

from __future__ import annotations

import torch

from studio.training.fast.triton_support import tl, triton, triton_runs

# Vocabulary entries each program of the kernels reads at a time.
BLOCK = 4096
# The PyTorch path works through the logits this many float32 values at a time (each of its few temporaries is
# then 256 MiB at most); the Triton kernels need no temporaries.
TILE_VALUES = 2**26
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


if triton is not None:
    @triton.jit
    def _row_statistics(logits_ptr, row_stride, labels_ptr, lse_ptr, log_probs_ptr, entropy_ptr, top1_ptr,
                        vocab: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        running_max = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), tl.float32)
        sum_exp_shifted = tl.zeros((), tl.float32)  # the sum of exp(x - max) x (x - max)
        best = tl.full((), float("-inf"), tl.float32)
        best_index = tl.zeros((), tl.int64)
        for start in range(0, vocab, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            block_best = tl.argmax(x, axis=0)
            # Strictly greater: an equal maximum in a later block is not the first one.
            best_index = tl.where(block_max > best, start + block_best.to(tl.int64), best_index)
            best = tl.maximum(best, block_max)
            new_max = tl.maximum(running_max, block_max)
            rescale = tl.exp(running_max - new_max)
            shifted = tl.where(inside, x - new_max, 0.0)
            e = tl.where(inside, tl.exp(shifted), 0.0)
            # Both sums are relative to the running maximum, so the entropy below is a difference of two small
            # numbers, not of two large ones. (The first block's 0 x -inf never happens: its sums are 0.)
            moved = sum_exp * tl.where(sum_exp > 0, running_max - new_max, 0.0)
            sum_exp_shifted = (sum_exp_shifted + moved) * rescale + tl.sum(e * shifted, axis=0)
            sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
            running_max = new_max
        lse = running_max + tl.log(sum_exp)
        label_logit = tl.load(base + label).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(log_probs_ptr + row, label_logit - lse)
        tl.store(entropy_ptr + row, tl.log(sum_exp) - sum_exp_shifted / sum_exp)
        tl.store(top1_ptr + row, (best_index == label).to(tl.int8))

    @triton.jit
    def _logits_to_gradient(logits_ptr, row_stride, labels_ptr, lse_ptr, grad_ptr, vocab: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr):
        """d(grad . log p[label]) / d logits = grad x (one-hot(label) - softmax), written over the logits."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        grad = tl.load(grad_ptr + row)
        for start in range(0, vocab, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            d = tl.where(cols == label, grad, 0.0) - grad * tl.exp(x - lse)
            tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=inside)


def _statistics(logits: torch.Tensor, labels: torch.Tensor):
    """(lse, log_probs, entropy, is_top1) of each row of `logits`, all float32 but the flag."""
    rows, vocab = logits.shape
    if triton_runs(logits.device):
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        log_probs, entropy = torch.empty_like(lse), torch.empty_like(lse)
        top1 = torch.empty(rows, dtype=torch.int8, device=logits.device)
        if rows:
            _row_statistics[(rows,)](logits, logits.stride(0), labels, lse, log_probs, entropy, top1, vocab,
                                     BLOCK_SIZE=BLOCK)
        return lse, log_probs, entropy, top1.bool()
    parts = []
    step = _rows_per_tile(vocab)
    for start in range(0, rows, step):
        x = logits[start:start + step].float()
        y = labels[start:start + step]
        top = x.amax(-1, keepdim=True)
        shifted = x - top  # as in the kernel: the entropy from numbers near zero
        shifted_lse = torch.logsumexp(shifted, dim=-1)
        lse = shifted_lse + top.squeeze(1)
        p = torch.exp(shifted - shifted_lse[:, None])
        parts.append((lse, x.gather(1, y[:, None]).squeeze(1) - lse, shifted_lse - (p * shifted).sum(-1),
                      x.argmax(-1) == y))
    if not parts:
        nothing = torch.empty(0, device=logits.device)
        return nothing, nothing.clone(), nothing.clone(), nothing.bool()
    return tuple(torch.cat(column) for column in zip(*parts))


def _rows_per_tile(vocab: int) -> int:
    return max(1, TILE_VALUES // max(1, vocab))


def _to_gradient(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The logits' gradient, in place of the logits (which are not needed after)."""
    rows, vocab = logits.shape
    if triton_runs(logits.device):
        if rows:
            _logits_to_gradient[(rows,)](logits, logits.stride(0), labels, lse, grad, vocab, BLOCK_SIZE=BLOCK)
        return logits
    step = _rows_per_tile(vocab)
    for start in range(0, rows, step):
        tile = logits[start:start + step]
        g = grad[start:start + step, None]
        d = -g * torch.exp(tile.float() - lse[start:start + step, None])
        d.scatter_add_(1, labels[start:start + step, None], g)
        tile.copy_(d)
    return logits


class KeptLogitsHead(torch.autograd.Function):
    """log p(label), entropy and is-top-1 of each row of `hidden` through the LM head (`weight`, `bias`), with the
    logits kept for the backward. `hidden`: [rows, hidden size], in the weight's type; `labels`: [rows], each a
    valid index. The logits are in the weight's type too (16-bit where the planner turns this head on)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden @ weight.t()
            if bias is not None:  # added after the 16-bit product, as TRL does, so both heads round alike
                logits.add_(bias.to(logits.dtype))
        labels = labels.contiguous()
        lse, log_probs, entropy, top1 = _statistics(logits, labels)
        # The hidden states only make the weight's gradient (a frozen head, as under LoRA, needs none).
        ctx.save_for_backward(hidden if ctx.needs_input_grad[1] else None, weight, logits, labels, lse)
        ctx.has_bias = bias is not None
        ctx.consumed = False
        ctx.mark_non_differentiable(entropy, top1)
        return log_probs, entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_top1):
        if ctx.consumed:
            raise RuntimeError("The kept-logits LM head turns its logits into their gradient in place: "
                               "it supports one backward per forward.")
        ctx.consumed = True
        hidden, weight, logits, labels, lse = ctx.saved_tensors
        if grad_log_probs is None:
            return None, None, None, None
        grad_logits = _to_gradient(logits, labels, lse, grad_log_probs.float().contiguous())
        with torch.autocast(weight.device.type, enabled=False):
            grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
            grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
            grad_bias = grad_logits.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


class TRLHeadWithKeptLogits:
    """Stands in for TRL's chunked log-probability function (same call, same five per-token results) inside the
    fused head's forward. Where the call asks for anything this head does not compute (a temperature, soft-capped
    or scaled logits, other outputs), or where TRL would compute in another type than this head (anything but
    16-bit hidden states and weight of one type: TRL follows autocast or the hidden states' type), TRL's own
    function runs."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    def apply(self, hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):
        plain = (temperature == 1.0 and softcap is None and logit_scale == 1.0
                 and set(outputs) <= {"log_probs", "entropy", "is_top1"}
                 and weight.dtype in SIXTEEN_BIT and hidden.dtype == weight.dtype)
        if not plain:
            return self.trl_function.apply(hidden, weight, bias, labels, temperature, chunk_size, softcap,
                                           logit_scale, outputs)
        log_probs, entropy, top1 = KeptLogitsHead.apply(hidden, weight, bias, labels)
        return (log_probs, entropy if "entropy" in outputs else None, None, None,
                top1 if "is_top1" in outputs else None)
