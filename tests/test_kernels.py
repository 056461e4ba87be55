"""PyTorch's fused RMSNorm in place of transformers' seven-op one: same numbers, chosen where Liger is not."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _norm_pair(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    reference = LlamaRMSNorm(48, eps=1e-5)
    reference.weight.data.normal_(1.0, 0.2)
    fused = LlamaRMSNorm(48, eps=1e-5)
    fused.load_state_dict(reference.state_dict())
    return reference.to(dtype), fused.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_the_transformers_norm(dtype):
    from studio.training.fast.kernels import fused_rms_norm_available, use_fused_rms_norm
    if not fused_rms_norm_available():
        pytest.skip("this torch has no aten::_fused_rms_norm")
    reference, fused = _norm_pair(dtype)
    holder = torch.nn.Sequential(fused)
    assert use_fused_rms_norm(holder) == 1
    x = torch.randn(3, 7, 48, dtype=dtype) * 3
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = reference(x1), fused(x2)
    assert y.dtype == y_ref.dtype == dtype
    # bf16: the reference rounds the normalised values before the weight, the fused kernel after.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    grad = torch.randn_like(y)
    y_ref.backward(grad)
    y.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, reference.weight.grad, **(tol if dtype == torch.float32 else
                                                                          dict(rtol=5e-2, atol=5e-1)))


def test_fused_rms_norm_keeps_the_exact_formula_for_mixed_dtypes():
    """A float32 norm over bf16 activations is left to transformers' formula (the fused kernel needs one dtype)."""
    from studio.training.fast.kernels import use_fused_rms_norm
    reference, fused = _norm_pair(torch.float32)
    use_fused_rms_norm(torch.nn.Sequential(fused))
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), reference(x))


def test_fused_rms_norm_is_planned_where_liger_is_not():
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine, tiny_config
    cfg = tiny_config("unused")
    plan = plan_speed(cfg, machine(fused_rms_norm=True))
    assert plan.fused_norm and not plan.liger and "RMSNorm" in plan.summary()
    assert not plan_speed(cfg, machine(model_type="gemma", fused_rms_norm=True)).fused_norm  # Gemma's adds one
    assert not plan_speed(cfg, machine("cpu", fused_rms_norm=True)).fused_norm
    assert not plan_speed(tiny_config("unused", training={"fused_kernels": "off"}),
                          machine(fused_rms_norm=True)).fused_norm
    assert not plan_speed(cfg, machine(fused_rms_norm=False)).fused_norm  # this torch has no fused kernel
    with_liger = plan_speed(cfg, machine(fused_rms_norm=True, liger_installed=True))
    assert with_liger.liger and not with_liger.fused_norm  # Liger brings its own RMSNorm
