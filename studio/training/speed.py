"""How a run trains fast on the machine it lands on: the studio picks these for every user.

- Packing (padding-free, best-fit): on a GPU, short conversations are packed into full rows so no
  compute goes to padding. On the CPU rows are short and the dense masks cost more than padding.
- Attention: packed rows need a kernel that keeps documents apart without a dense mask. flash-attn
  has no wheel for most users, so PyTorch's own flex attention (block-sparse document masks) is used.
- Fused kernels: LoRA projections with the add-on folded into the base matmul (fused_lora.py, on
  GPUs), and Liger's RMSNorm, RoPE and SwiGLU kernels when the package is installed (NVIDIA only).
  The LM head and loss are already computed in chunks by TRL (no full-vocabulary logits in memory).
- Data loading: on a GPU, batches are put together in two worker processes ahead of time; in the main
  process the GPU sat idle while each batch was built (~14 ms a step on the 1B benchmark shape).
  On the CPU every core is already training, so batches are built in line.
- Gradient checkpointing: only when the memory estimate says the run would not fit without it; it
  costs ~30-50% more compute for nothing when memory is there.
- QLoRA keeps embeddings and the LM head in bf16 (PEFT's kbit preparation upcasts them to float32,
  4 GB more on an 8B model with a 128k vocabulary).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field

from studio.config import RunConfig

LIGER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2")


@dataclass
class SpeedPlan:
    packing: bool
    attention: str
    liger: bool
    gradient_checkpointing: bool
    fused_lora: bool = False
    data_workers: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = ["packed rows" if self.packing else "padded rows", f"{self.attention} attention"]
        if self.fused_lora:
            parts.append("fused LoRA")
        if self.liger:
            parts.append("Liger kernels")
        parts.append("gradient checkpointing" if self.gradient_checkpointing else "no checkpointing")
        return ", ".join(parts)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def plan_speed(cfg: RunConfig, device: str, model_type: str = "", parameters: int = 0, hidden_size: int = 0,
               num_layers: int = 0, free_gib: float | None = None) -> SpeedPlan:
    t, method = cfg.training, cfg.method.method
    reasons = []
    prompt_learning = method in ("prompt_tuning", "prefix_tuning")
    if t.packing == "auto":
        packing = device == "cuda" and not prompt_learning
        reasons.append("packing: on for GPUs (no compute on padding)" if packing else
                       "packing: off (CPU rows are short, or prompt/prefix tuning)")
    else:
        packing = t.packing == "on"
    if t.attention != "auto":
        attention = t.attention
    elif packing and device == "cuda":
        attention = "flex_attention"
        reasons.append("attention: flex (keeps packed documents apart without a dense mask)")
    else:
        attention = "sdpa"
    # Liger's kernels are Triton (NVIDIA GPUs) and cover certain architectures: 'on' cannot force them
    # where they cannot run, it says why instead of failing the run.
    liger = t.fused_kernels != "off" and device == "cuda" and liger_available() and model_type in LIGER_MODEL_TYPES
    if t.fused_kernels == "on" and not liger:
        reasons.append("Liger kernels: not used (they need an NVIDIA GPU, pip install liger-kernel, and a "
                       f"supported architecture: {', '.join(LIGER_MODEL_TYPES)})")
    if t.gradient_checkpointing != "auto":
        checkpointing = t.gradient_checkpointing == "on"
    elif device != "cuda":
        checkpointing = False
        reasons.append("checkpointing: off on the CPU (memory is not the limit there)")
    elif method in ("qlora", "lora8bit"):
        checkpointing = True
        reasons.append("checkpointing: on, QLoRA and 8-bit are chosen to save memory, so activations stay small too")
    else:
        checkpointing = _needs_checkpointing(cfg, parameters, hidden_size, num_layers, free_gib)
        reasons.append("checkpointing: on, the estimate does not fit in free GPU memory without it"
                       if checkpointing else "checkpointing: off, it fits without")
    # Fused LoRA removes GPU memory passes; on the CPU it measured no faster (bench/cpu.py: 3.6-3.9 s a step
    # either way), so 'auto' keeps PEFT's own forward there.
    fused_lora = method in ("lora", "rslora", "qlora") and (
        t.fused_kernels == "on" or (t.fused_kernels == "auto" and device == "cuda"))
    workers = 2 if device == "cuda" and os.name == "posix" else 0  # workers fork; elsewhere they would re-import
    return SpeedPlan(packing, attention, liger, checkpointing, fused_lora=fused_lora, data_workers=workers,
                     reasons=reasons)


def _needs_checkpointing(cfg: RunConfig, parameters: int, hidden: int, layers: int, free_gib: float | None) -> bool:
    from studio.models import memory_estimate_gib
    if not parameters or free_gib is None:
        return cfg.method.method == "full"  # no estimate possible: the cautious choice only where it matters most
    tokens = cfg.training.batch_size * cfg.data.max_length
    need = memory_estimate_gib(parameters, cfg.method.method, "cuda", batch_tokens=tokens, hidden_size=hidden,
                               num_layers=layers)
    return need > 0.85 * free_gib
