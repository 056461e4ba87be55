"""The matmuls of one 8B decoder layer with LoRA, timed alone on the GPU (CUDA only), in the forms the fused LoRA path
(studio/training/fast/fused_lora.py) runs them and in the alternatives considered for it.

    python bench/matmul_shapes.py [--tokens 8192] [--rank 16]

Prints, per operation, microseconds a call and TFLOP/s (median of 20 timed calls after 5 warm-up calls). The step
profile (profile_step.py --shapes) says how much of a step each shape takes; this says how fast each could go.
"""

from __future__ import annotations

import argparse
import json


def timed(fn, iters: int = 20) -> float:
    import torch
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    import torch
    import torch.nn.functional as F
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    m, r, h, kv, inter = args.tokens, args.rank, 4096, 1024, 14336
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, xi = torch.randn(m, h, **bf), torch.randn(m, inter, **bf)
    w = {n: torch.randn(o, i, **bf) * 0.02 for n, o, i in (("q", h, h), ("k", kv, h), ("o", h, h), ("gate", inter, h),
                                                            ("down", h, inter), ("qkv", h + 2 * kv, h),
                                                            ("gateup", 2 * inter, h))}
    g = {n: torch.randn(m, t.shape[0], **bf) for n, t in w.items()}
    a1, a3 = torch.randn(r, h, **bf), torch.randn(3 * r, h, **bf)
    b_h, b_i = torch.randn(h, r, **bf), torch.randn(inter, r, **bf)
    xa, xa3 = torch.randn(m, r, **bf), torch.randn(m, 3 * r, **bf)
    a_i = torch.randn(r, inter, **bf)
    out_h, out_i, out_qkv = torch.empty(m, h, **bf), torch.empty(m, inter, **bf), torch.empty(m, h + 2 * kv, **bf)
    # The LoRA terms folded into the base matmuls along K without copies per call: the layer input between two slots of
    # `pad` columns (the gate's rank-r input on its left, the up's on its right) and the weights laid out to match.
    pad = 64
    x_ext, x_ext_r = torch.randn(m, pad + h + pad, **bf), torch.randn(m, r + h + r, **bf)
    w_gate_ext, w_up_ext = torch.randn(inter, pad + h, **bf) * 0.02, torch.randn(inter, h + pad, **bf) * 0.02
    w_gate_ext_r = torch.randn(inter, r + h, **bf) * 0.02
    x_k = torch.randn(m, h + pad, **bf)
    g_ext, w_down_ext = torch.randn(m, h + pad, **bf), torch.randn(h + pad, inter, **bf) * 0.02
    cases = {
        # forward: base projections
        "fwd q   x@Wq^T": (lambda: F.linear(x, w["q"]), m * h * h),
        "fwd k/v x@Wk^T": (lambda: F.linear(x, w["k"]), m * h * kv),
        "fwd qkv one matmul": (lambda: F.linear(x, w["qkv"]), m * h * (h + 2 * kv)),
        "fwd gate x@Wg^T": (lambda: F.linear(x, w["gate"]), m * h * inter),
        "fwd gate+up one matmul": (lambda: F.linear(x, w["gateup"]), m * h * 2 * inter),
        "fwd down h@Wd^T": (lambda: F.linear(xi, w["down"]), m * h * inter),
        # forward: LoRA
        "fwd x@A^T (3 stacked)": (lambda: x @ a3.t(), m * h * 3 * r),
        "fwd out+=xa@B^T (4096)": (lambda: out_h.addmm_(xa, b_h.t()), m * h * r),
        "fwd out+=xa@B^T (14336)": (lambda: out_i.addmm_(xa, b_i.t()), m * inter * r),
        "fwd out[:, :4096]+=xa@B^T (slice)": (lambda: out_qkv[:, :h].addmm_(xa, b_h.t()), m * h * r),
        # backward: input gradients of the base
        "bwd gq@Wq": (lambda: g["q"] @ w["q"], m * h * h),
        "bwd +=gk@Wk (addmm_)": (lambda: out_h.addmm_(g["k"], w["k"]), m * h * kv),
        "bwd gqkv@Wqkv one matmul": (lambda: g["qkv"] @ w["qkv"], m * h * (h + 2 * kv)),
        "bwd cat(gq,gk,gv)": (lambda: torch.cat([g["q"], g["k"], g["k"]], dim=1), 0),
        "bwd gg@Wg": (lambda: g["gate"] @ w["gate"], m * h * inter),
        "bwd +=gu@Wu (addmm_)": (lambda: out_h.addmm_(g["gate"], w["gate"]), m * h * inter),
        "bwd g(gate,up)@Wgu one matmul": (lambda: g["gateup"] @ w["gateup"], m * h * 2 * inter),
        "bwd gd@Wd": (lambda: g["down"] @ w["down"], m * h * inter),
        # backward: LoRA
        "bwd +=g_xa@A (4096, r)": (lambda: out_h.addmm_(xa, a1), m * h * r),
        "bwd +=g_xa@A (4096, 3r)": (lambda: out_h.addmm_(xa3, a3), m * h * 3 * r),
        "bwd +=g_xa@A (14336, r)": (lambda: out_i.addmm_(xa, a_i), m * inter * r),
        # the same accumulations in other forms: the transposed problem (cuBLAS picks its kernel by layout), a
        # separate product then an add, and the LoRA term folded into the base matmul along K
        "bwd +=g_xa@A (4096, 3r) transposed": (lambda: out_h.t().addmm_(a3.t(), xa3.t()), m * h * 3 * r),
        "bwd +=g_xa@A (14336, r) transposed": (lambda: out_i.t().addmm_(a_i.t(), xa.t()), m * inter * r),
        "bwd +=g_xa@A (14336, r) mm then add_": (lambda: out_i.add_(xa @ a_i), m * inter * r),
        "bwd gd@Wd (base alone, for the K-fold)": (lambda: torch.mm(g["q"], w["down"]), m * h * inter),
        "bwd [gd,g_xa]@[Wd;A] K-fold with cats": (lambda: torch.cat([g["q"], xa], 1) @ torch.cat([w["down"], a_i]),
                                                  m * (h + r) * inter),
        "fwd gate K-fold [xa|x]@[B|Wg]^T, K 4096+64, input strided": (
            lambda: F.linear(x_ext[:, :pad + h], w_gate_ext), m * (h + pad) * inter),
        "fwd up K-fold [x|xa]@[Wu|B]^T, K 4096+64, input strided at +64": (
            lambda: F.linear(x_ext[:, pad:], w_up_ext), m * (h + pad) * inter),
        "fwd gate K-fold, K 4096+r, input strided": (
            lambda: F.linear(x_ext_r[:, :r + h], w_gate_ext_r), m * (h + r) * inter),
        "fwd gate K 4096+64 contiguous": (lambda: F.linear(x_k, w_gate_ext), m * (h + pad) * inter),
        "fwd gate x@Wg^T, Wg a strided view": (lambda: F.linear(x, w_gate_ext[:, pad:]), m * h * inter),
        "bwd gg@Wg, Wg a strided view": (lambda: g["gate"] @ w_gate_ext[:, pad:], m * h * inter),
        "copy x into its slot of x_ext": (lambda: x_ext[:, pad:pad + h].copy_(x), 0),
        "bwd down K-fold [gd|g_xa]@[Wd;A], K 4096+64": (lambda: g_ext @ w_down_ext, m * (h + pad) * inter),
        "bwd gd@Wd, Wd the first rows of [Wd;A]": (lambda: g["q"] @ w_down_ext[:h], m * h * inter),
        "fwd out+=xa@B^T (14336) transposed": (lambda: out_i.t().addmm_(b_i, xa.t()), m * inter * r),
        "bwd g@B (4096)": (lambda: g["q"] @ b_h, m * h * r),
        "bwd g@B (14336)": (lambda: g["gate"] @ b_i, m * inter * r),
        "bwd grad_A g_xa^T@x": (lambda: xa3.t() @ x, m * h * 3 * r),
        "bwd grad_B g^T@xa (4096)": (lambda: g["q"].t() @ xa, m * h * r),
        "bwd grad_B g^T@xa (14336)": (lambda: g["gate"].t() @ xa, m * inter * r),
    }
    for name, (fn, macs) in cases.items():
        us = timed(fn)
        print(json.dumps({"op": name, "us": round(us, 1), "tflops": round(2 * macs / us / 1e6, 1) if macs else None}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
