"""The thin-product accumulation kernel (studio/training/fast/low_rank.py): out += left @ right, checked under triton's
interpreter against float64 for every layout fused_lora.py hands it, its fallbacks, and a fused LoRA model that
trains through it to PEFT's numbers."""

import pytest
import torch

from studio.training.fast import low_rank
from tests.interpreter import passes_under_the_interpreter


def _check_the_kernel_against_float64():
    """Uneven tiles both ways (BLOCK_M x BLOCK_N = 64 x 128), ranks below, at and above the dot's 16 up to MAX_RANK;
    the factors as fused_lora passes them: B^T (a transposed view), a column slice of the stacked x A^T, a row-major
    A; the output a view whose rows are longer than its columns (the rest of each row must stay untouched)."""
    g = torch.Generator().manual_seed(0)
    calls = []
    takes = low_rank._kernel_takes
    low_rank._kernel_takes = lambda *a: calls.append(takes(*a)) or calls[-1]
    low_rank.use_kernel(True)
    try:
        for dtype in (torch.bfloat16, torch.float16):
            for tokens, width, rank in ((70, 200, 4), (130, 300, 16), (64, 128, 48), (9, 260, 128)):
                left_all = torch.randn(tokens, rank + 8, generator=g).to(dtype)
                left = left_all[:, 3:3 + rank]  # a column slice: rows `rank + 8` apart
                for right in (torch.randn(width, rank, generator=g).to(dtype).t(),  # B^T
                              torch.randn(rank, width, generator=g).to(dtype)):  # A
                    base = torch.randn(tokens, width + 40, generator=g).to(dtype)
                    out = base.clone()[:, :width]
                    want = out.double() + left.double() @ right.double()
                    version = out._version
                    assert low_rank.accumulate_(out, left, right) is out
                    assert calls[-1] is True and out._version > version
                    assert (out.double() - want).abs().max() <= 1e-2 * want.abs().max()
                    assert torch.equal(out._base[:, width:], base[:, width:])
    finally:
        low_rank._kernel_takes = takes
        low_rank.use_kernel(False)


def test_the_kernel_matches_float64_under_the_interpreter():
    passes_under_the_interpreter("from tests.test_low_rank import _check_the_kernel_against_float64\n"
                                 "_check_the_kernel_against_float64()")


def test_what_the_kernel_does_not_take_is_addmm():
    """Off (the default), on the CPU without the interpreter, in float32, above MAX_RANK: PyTorch's addmm_, in place."""
    g = torch.Generator().manual_seed(1)
    low_rank.use_kernel(True)
    try:
        for dtype, rank in ((torch.bfloat16, 8), (torch.float32, 8), (torch.bfloat16, low_rank.MAX_RANK + 1)):
            out, left, right = (torch.randn(*s, generator=g).to(dtype) for s in ((5, 7), (5, rank), (rank, 7)))
            assert not low_rank._kernel_takes(out, left, right)  # no Triton here: the interpreter is off
            want = out.clone().addmm_(left, right)
            assert low_rank.accumulate_(out, left, right) is out and torch.equal(out, want)
    finally:
        low_rank.use_kernel(False)


def _check_a_fused_model_trains_like_peft():
    """A tiny Llama, LoRA on every projection, bf16: with the kernel on, the fused path (grouped q/k/v and gate/up,
    single o and down, their input gradients) gives PEFT's loss and adapter gradients within bf16 rounding."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    from tests.test_fused_lora import _peft_pair
    reference, fused = _peft_pair()
    for model in (reference, fused):
        model.to(torch.bfloat16)
    fuse_lora_layers(fused)
    calls = []
    takes = low_rank._kernel_takes
    low_rank._kernel_takes = lambda *a: calls.append(takes(*a)) or calls[-1]
    low_rank.use_kernel(True)
    try:
        ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
        results = []
        for model in (reference, fused):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    finally:
        low_rank._kernel_takes = takes
        low_rank.use_kernel(False)
    # forward: 2 layers x (q, k, v, o, gate, up, down); backward: the input gradients of o, down and the two groups,
    # except the first layer's q/k/v, whose input (the frozen embeddings, normed) needs none
    assert calls == [True] * (2 * 7 + 2 * 4 - 1), calls
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss - ref_loss) <= 1e-2 * abs(ref_loss)
    for name, want in ref_grads.items():
        assert (grads[name] - want).abs().max() <= 5e-2 * want.abs().max(), name


@pytest.mark.slow
def test_a_fused_model_trains_like_peft_through_the_kernel():
    passes_under_the_interpreter("from tests.test_low_rank import _check_a_fused_model_trains_like_peft\n"
                                 "_check_a_fused_model_trains_like_peft()")


def test_the_planner_uses_it_with_fused_lora_where_triton_runs_and_a_run_switches_it():
    from studio.training.fast import apply
    from studio.training.fast.plan import SpeedPlan
    from tests.test_fused_lora import _peft_pair
    from tests.test_lora_mlp import _plan
    plan = _plan(dropout=0.05)  # the studio's default dropout: the kernel does not depend on it
    assert plan.lora_accumulate_kernel and "LoRA terms" in plan.summary()
    assert _plan(method="qlora").lora_accumulate_kernel
    for off in (_plan(triton=False), _plan(device="cpu", fused_kernels="on"), _plan(precision="fp32"),
                _plan(stage="grpo"), _plan(speed="plain"), _plan(method="full")):
        assert not off.lora_accumulate_kernel and "LoRA terms" not in off.summary()
    run = SpeedPlan(packing=True, attention="sdpa", liger=False, gradient_checkpointing=False, fused_lora=True,
                    lora_accumulate_kernel=True)
    try:
        apply.adapt_peft_model(_peft_pair()[0], run)
        assert low_rank._enabled
        apply.finish(run)
        assert not low_rank._enabled
    finally:
        low_rank.use_kernel(False)
