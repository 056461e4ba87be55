"""PyTorch's own fused RMSNorm for the models whose norm is the plain Llama one.

transformers computes RMSNorm as seven separate ops (cast to float32, square, mean, add, rsqrt, multiply,
cast back, multiply by the weight), and its backward as more: with two norms a layer, hundreds of kernel
launches a step, each with its host-side cost, plus float32 copies kept for the backward. PyTorch has one
fused kernel for the forward and one for the backward (``aten::_fused_rms_norm``). It is called directly:
through ``F.rms_norm`` autocast would first cast a bf16 input to float32.

Where Liger is installed its kernels are used instead: on the 8B QLoRA benchmark they measured faster than
this norm with transformers' SwiGLU and RoPE (bench/NOTES.md).
"""

from __future__ import annotations

import types

import torch

# Norm classes whose forward is exactly the Llama formula: weight * (x / rms(x)), computed in float32.
# (Gemma's adds one to the weight, OLMo's casts after multiplying: they keep their own forward.)
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def fused_rms_norm_available() -> bool:
    return hasattr(torch.ops.aten, "_fused_rms_norm")


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if weight.dtype != hidden_states.dtype:  # e.g. float32 norms over bf16 activations: keep the exact formula
        return type(self).forward(self, hidden_states)
    return torch.ops.aten._fused_rms_norm(hidden_states, [hidden_states.shape[-1]], weight,
                                          self.variance_epsilon)[0]


def use_fused_rms_norm(model) -> int:
    """Route every plain RMSNorm of `model` through the fused kernel; returns how many."""
    if not fused_rms_norm_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ in PLAIN_RMS_NORMS and hasattr(module, "variance_epsilon") \
                and getattr(module, "weight", None) is not None:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
