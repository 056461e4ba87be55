"""Whether the studio's own Triton kernels (lm_head.py, lora_mlp.py) can run: Triton comes with CUDA builds of torch,
not with the CPU build. Under triton's interpreter (TRITON_INTERPRET=1) the kernels run on the CPU, which is how the
tests check them on machines without a GPU."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only torch build has no Triton
    triton = tl = None


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on `device`: on a CUDA GPU, or anywhere under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or interpreted()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
