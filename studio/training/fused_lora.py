"""LoRA projections without the full-size elementwise passes PEFT spends around the matmuls.

PEFT computes a LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the three matmuls,
then a scale and an add over the whole (tokens x out_features) output, and in the backward the same
scale plus an add of the two input gradients; for a 4-bit base it also copies the output defensively.
The profile of the 1B benchmark shape put those passes at about 15% of the GPU time of a step.

Here the scale is folded into the small B matrix (out_features x rank) and both adds are folded into the
last matmul (``addmm_`` accumulates into the base result), so what remains per projection is the matmuls.
The computation and the saved tensors are the same as PEFT's (the layer input and the rank-sized
``x @ A^T``); the adapters, their checkpoints and merging are untouched, only ``forward`` is routed here.

Anything this path does not cover (DoRA and the other variants, merged or disabled adapters, several
active adapters, per-request adapter names, LoRA bias, 8-bit bases) falls back to PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a (out_features x in_features) matrix in `dtype`; 4-bit weights are dequantised
    here, for the forward and again in the backward, as bitsandbytes itself does."""
    if quant_state is None:
        return weight.to(dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, _block_scales(quant_state), quant_state.blocksize, quant_state.quant_type, quant_state.shape,
        quant_state.dtype).to(dtype)


def _block_scales(quant_state) -> torch.Tensor:
    """The per-block scales of a 4-bit weight, in float32. With double quantisation they are themselves
    quantised, and bitsandbytes unpacks them on every call (two more kernels and their Python each time, three
    times per step with checkpointing: QLoRA is bound by the host, not the GPU). They are unpacked once and
    kept: 4 bytes per 64 weights, ~0.4 GB on an 8B model, well inside the QLoRA memory goal."""
    cached = getattr(quant_state, "_studio_scales", None)
    if cached is None:
        if quant_state.nested:
            import bitsandbytes.functional as bnb_functional
            cached = (bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
                      + quant_state.offset).float()
        else:
            cached = quant_state.absmax.float()
        quant_state._studio_scales = cached
    return cached


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, quant_state, lora_a, lora_b, scaling: float, dropout_p: float, dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # every operand is already in `dtype`
            out = F.linear(x2, _dense_weight(weight, quant_state, dtype), None if bias is None else bias.to(dtype))
            mask = None
            x_lora = x2
            if dropout_p > 0:
                x_lora, mask = torch.ops.aten.native_dropout(x2, dropout_p, True)
            a = lora_a.to(dtype)
            b_scaled = (lora_b * scaling).to(dtype)  # (out x rank): far smaller than scaling the output
            xa = x_lora @ a.t()
            out.addmm_(xa, b_scaled.t())  # the LoRA term lands in the base result, no separate add
        ctx.save_for_backward(x2, xa, mask, a, b_scaled, weight)
        ctx.quant_state, ctx.scaling, ctx.dropout_p, ctx.dtype = quant_state, scaling, dropout_p, dtype
        ctx.x_shape, ctx.x_dtype, ctx.param_dtypes = x.shape, x.dtype, (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, mask, a, b_scaled, weight = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        keep = 1.0 / (1.0 - ctx.dropout_p) if mask is not None else 1.0
        with torch.autocast(g.device.type, enabled=False):
            g_xa = g @ b_scaled  # (tokens x rank)
            if ctx.needs_input_grad[0]:
                grad_x = g @ _dense_weight(weight, ctx.quant_state, dtype)
                if mask is None:
                    grad_x.addmm_(g_xa, a)  # the LoRA path's input gradient, accumulated in the same matmul
                else:
                    grad_x.add_(torch.ops.aten.native_dropout_backward(g_xa @ a, mask, keep))
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[4]:
                x_lora = x2 if mask is None else torch.ops.aten.native_dropout_backward(x2, mask, keep)
                grad_a = (g_xa.t() @ x_lora).to(ctx.param_dtypes[0])
            if ctx.needs_input_grad[5]:
                grad_b = (g.t() @ xa).mul_(ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, None, None, None, grad_a, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _base_parts(layer):
    """(weight, bias, quant_state) of a frozen base layer this path handles, or None."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if isinstance(base, torch.nn.Linear) and type(weight) is torch.nn.Parameter and weight.dim() == 2:
        return weight, base.bias, None
    quant_state = getattr(weight, "quant_state", None)
    if type(base).__name__ == "Linear4bit" and quant_state is not None:
        # The packed bytes as a plain tensor: bitsandbytes' parameter subclass routes every op through Python.
        return weight.data, base.bias, quant_state
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs):
    active = self.active_adapters
    adapter = active[0] if len(active) == 1 else None
    parts = None
    if not (args or kwargs or self.disable_adapters or self.merged or adapter is None
            or adapter not in self.lora_A or adapter in self.lora_variant or self.lora_B[adapter].bias is not None):
        parts = _base_parts(self)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    weight, bias, quant_state = parts
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    return _LoraLinear.apply(x, weight, bias, quant_state, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             float(self.scaling[adapter]), float(p), _compute_dtype(x))


def fuse_lora_layers(model) -> int:
    """Route every LoRA projection of `model` that this path covers through it; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    classes: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        classes += (LoraLinear4bit,)
    except ImportError:  # bitsandbytes is not installed: there are no 4-bit layers either
        pass
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not getattr(module, "fan_in_fan_out", False) \
                and not getattr(module, "lora_variant", None) and _base_parts(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
