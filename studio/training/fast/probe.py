"""Find out what the speed plan depends on: the device, the GPU's free memory and generation, which fused
kernels this machine has, and the model's shape from its config (no weights read)."""

from __future__ import annotations

import importlib.util
import os

from studio.config import RunConfig
from studio.shapes import ModelShape, head_dim_of
from studio.training.fast.plan import Machine


def probe(cfg: RunConfig, location: str, device: str) -> Machine:
    import torch
    from transformers import AutoConfig

    from studio import models
    config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    from studio.distributed import world
    machine = Machine(device=device, model_type=getattr(text, "model_type", ""), shape=ModelShape.from_config(text),
                      forks=os.name == "posix", processes=world().size)
    from studio.training.fast import kernels, varlen_attention
    dtype = models.pick_dtype(cfg.training.precision, device)
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    machine.varlen_ok = varlen_attention.supported(text, capability, dtype) \
        and varlen_attention.kernel_runs(head_dim_of(text), dtype)  # supported() says no without a GPU
    machine.cudnn_attention_ok = machine.varlen_ok and varlen_attention.cudnn_runs(head_dim_of(text), dtype)
    if machine.varlen_ok and cfg.training.speed != "plain" and capability \
            and capability[0] in varlen_attention.FLASH4_GENERATIONS:
        if not varlen_attention.flash4_installed(capability):
            machine.flash4 = "missing"
        else:
            heads = text.num_attention_heads
            runs = varlen_attention.flash4_runs(heads, getattr(text, "num_key_value_heads", None) or heads,
                                                head_dim_of(text), dtype)
            machine.flash4 = "ok" if runs else "failed"
    if device == "cuda":
        machine.free_gib = torch.cuda.mem_get_info()[0] / 2**30
        machine.host_free_gib = host_available_gib()
        machine.liger_installed = importlib.util.find_spec("liger_kernel") is not None
        # The studio's Triton kernels are checked on NVIDIA GPUs only (not on ROCm's HIP build of torch).
        machine.triton_kernels_ok = importlib.util.find_spec("triton") is not None and torch.version.hip is None
        machine.fused_rms_norm = kernels.fused_rms_norm_available()
    return machine


def host_available_gib() -> float | None:
    """The host memory available to new allocations (Linux's MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None
