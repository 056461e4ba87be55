"""Causal attention of one long sequence, forward and backward, with each kernel PyTorch offers (CUDA only).

    python bench/attention_long.py [--lengths 16384,65536] [--heads 32] [--kv-heads 8] [--head-dim 128]

At long lengths the step is mostly attention (its work grows with the square of the length), so the kernel decides
the seconds a step. Arms: FlashAttention-2's variable-length kernel as the studio calls it (varlen_attention.py),
and SDPA restricted to one backend at a time (cuDNN, flash, memory-efficient), with grouped-query attention handled
by the kernel (enable_gqa) or by expanding the key/value heads first. Prints milliseconds forward, forward+backward,
and the forward+backward TFLOP/s (causal: half the square counted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeats: int = 3) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from studio.training.fast.varlen_attention import flash_varlen
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    h, kv, d = args.heads, args.kv_heads, args.head_dim
    for length in [int(x) for x in args.lengths.split(",")]:
        q = torch.randn((1, h, length, d), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn((1, kv, length, d), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn((1, kv, length, d), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn((1, h, length, d), device="cuda", dtype=torch.bfloat16)
        bounds = torch.tensor([0, length], device="cuda", dtype=torch.int32)
        flops = 4 * length * length * d * h / 2 * 3.5  # causal; backward 2.5x the forward

        def varlen():
            return flash_varlen(q.transpose(1, 2)[0], k.transpose(1, 2)[0], v.transpose(1, 2)[0], bounds, length,
                                0.0, None).transpose(0, 1).unsqueeze(0)

        def sdpa(backend, expand):
            def call():
                kk, vv = (k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)) if expand else (k, v)
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
            return call

        arms = {"varlen-fa2": varlen}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            arms[f"sdpa-{name}-gqa"] = sdpa(backend, False)
            arms[f"sdpa-{name}-expanded"] = sdpa(backend, True)
        reference = varlen().float()
        for name, fn in arms.items():
            try:
                out = fn()
                diff = (out.float() - reference).abs().max().item()
                fwd = timed(lambda: fn())

                def both():
                    fn().backward(grad)
                both_ms = timed(both)
                row = {"length": length, "arm": name, "fwd_ms": round(fwd, 1), "fwd_bwd_ms": round(both_ms, 1),
                       "tflops": round(flops / both_ms / 1e9, 1), "max_diff_vs_varlen": diff}
            except Exception as err:  # noqa: BLE001 - a backend that does not run here is a result too
                row = {"length": length, "arm": name, "error": str(err).splitlines()[0][:160]}
            q.grad = k.grad = v.grad = None
            print(json.dumps(row), flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
