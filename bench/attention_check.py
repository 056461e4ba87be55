"""Attention over the bench's packed rows, forward and backward, with each variable-length kernel PyTorch offers
(CUDA only): time, the GPU's energy, and agreement with FlashAttention-2.

    python bench/attention_check.py [--shapes 8b,1b] [--seconds 3] [--out DIR]

The bench packs its documents (log-normal lengths, median 384) into 4,096-token rows, so each attention call covers
many short causal sequences. Arms, on the same tokens and boundaries:
- `flash2`: FlashAttention-2's variable-length kernel as the studio calls it (varlen_attention.flash_varlen);
- `flash4`: FlashAttention-4 (the `flash-attn-4` package, kernels written in CuTe's Python DSL and compiled at the
  first call; on Hopper the FlashAttention-3 design: warp-group matrix instructions, producer and consumer warps);
- `cudnn`: cuDNN's fused attention given the same cumulative boundaries (`aten::_cudnn_attention_forward` with
  `cum_seq_q`, the path PyTorch's nested tensors take), grouped-query heads read by the kernel;
- `cudnn-expanded`: the same with the key/value heads copied out to the query heads first (where cuDNN's ragged
  path refuses grouped-query heads).
Each arm is checked against `flash2` (output and the three input gradients, largest difference over the largest
value), then run forward + backward for `--seconds` with the GPU's energy counter read around it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def packed_boundaries(rows: int, row_length: int) -> list[int]:
    """Cumulative boundaries of the bench's documents packed into rows of `row_length` tokens, best fit by
    decreasing length as the studio packs them, then `rows` of those rows drawn at random (the trainer shuffles them)
    and laid end to end (the padding-free collator's one flattened row)."""
    import random

    from bench.bench import make_documents
    lengths = sorted((len(d) for d in make_documents()), reverse=True)
    bins: list[list[int]] = []
    for length in lengths:
        fits = [b for b in bins if sum(b) + length <= row_length]
        if fits:
            max(fits, key=sum).append(length)
        else:
            bins.append([length])
    chosen = random.Random(0).sample(bins, rows)
    bounds = [0]
    for b in chosen:
        for length in b:
            bounds.append(bounds[-1] + length)
    return bounds


def attention_arms():
    import torch

    from studio.training.fast.varlen_attention import flash_varlen

    def flash2(q, k, v, bounds, longest):
        return flash_varlen(q, k, v, bounds, longest, 0.0, None)

    def cudnn(q, k, v, bounds, longest):
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, bounds, bounds, longest, longest, True, 0.0,
                                                       True, False)[0]

    def cudnn_expanded(q, k, v, bounds, longest):
        group = q.shape[1] // k.shape[1]
        return cudnn(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), bounds, longest)

    def flash4(q, k, v, bounds, longest):
        from flash_attn.cute.interface import flash_attn_varlen_func
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=bounds, cu_seqlens_k=bounds, max_seqlen_q=longest,
                                     max_seqlen_k=longest, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return {"flash2": flash2, "flash4": flash4, "cudnn": cudnn, "cudnn-expanded": cudnn_expanded}


def check_shape(shape: str, seconds: float, arms: list[str]) -> list[dict]:
    import torch

    from bench.bench import SHAPES, STUDIO_ROWS, PACK_LENGTH
    from bench.energy import EnergyMeter
    s = SHAPES[shape]
    heads, kv_heads, d = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    bounds_list = packed_boundaries(STUDIO_ROWS[(shape, "studio")], PACK_LENGTH)
    tokens = bounds_list[-1]
    lengths = [b - a for a, b in zip(bounds_list, bounds_list[1:])]
    longest = max(lengths)
    bounds = torch.tensor(bounds_list, device="cuda", dtype=torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size):
        return torch.randn(size, device="cuda", dtype=torch.bfloat16, generator=gen)

    # Transformers hands attention (tokens x heads x d) views of (heads x tokens x d)-strided projections; here the
    # kernels get contiguous inputs, the layout the studio's q/k/v take after RoPE.
    q, k, v, grad = rand(tokens, heads, d), rand(tokens, kv_heads, d), rand(tokens, kv_heads, d), rand(tokens, heads, d)
    causal_pairs = sum(L * (L + 1) // 2 for L in lengths)
    flops = 4 * causal_pairs * d * heads * 3.5  # forward 2 matmuls; backward 2.5x the forward
    results, reference = [], None
    for name, fn in attention_arms().items():
        if name not in arms:
            continue
        row = {"shape": shape, "arm": name, "tokens": tokens, "documents": len(lengths), "longest": longest}
        try:
            qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            first = time.perf_counter()
            out = fn(qs, ks, vs, bounds, longest)
            out.backward(grad)
            got = [out.detach().float(), qs.grad.float(), ks.grad.float(), vs.grad.float()]
            row["first_call_s"] = round(time.perf_counter() - first, 2)  # compiling, where the kernel is compiled
            if reference is None:
                reference = got
            row["difference"] = [round(float((a - b).abs().max() / b.abs().max()), 6) for a, b in zip(got, reference)]

            def once():
                qs.grad = ks.grad = vs.grad = None
                fn(qs, ks, vs, bounds, longest).backward(grad)

            for _ in range(3):
                once()
            torch.cuda.synchronize()
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            meter, calls, start = EnergyMeter(uuid=uuid), 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _ in range(10):
                    once()
                calls += 10
                torch.cuda.synchronize()
            elapsed, joules = time.perf_counter() - start, meter.joules()
            row.update(ms=round(1000 * elapsed / calls, 3), tflops=round(flops * calls / elapsed / 1e12, 1),
                       joules_per_call=joules and round(joules / calls, 4),
                       watts=joules and round(joules / elapsed, 1))
        except Exception as e:  # noqa: BLE001 - an arm this PyTorch or GPU cannot run is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def host_cost(shape: str, arms: list[str], calls: int = 300) -> list[dict]:
    """The host's time a call: the same heads on 4 sequences (200 tokens, longer than one tile as in packed rows, and
    three of 16), where the GPU's work is microseconds and the calls queue as fast as the host issues them. A step
    bound by the host pays this in every layer: forward, backward and each checkpointed layer's recomputed forward."""
    import torch

    from bench.bench import SHAPES
    s = SHAPES[shape]
    heads, kv_heads, d = s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    bounds = torch.tensor([0, 200, 216, 232, 248], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn((248, n, d), device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    results = []
    for name, fn in attention_arms().items():
        if name not in arms:
            continue
        row = {"shape": shape, "arm": name, "host_cost": True}
        try:
            for label, with_grad in (("forward_backward_ms", True), ("forward_no_grad_ms", False)):
                def once():
                    with torch.set_grad_enabled(with_grad):
                        out = fn(q, k, v, bounds, 200)
                    if with_grad:
                        out.sum().backward()
                for _ in range(5):
                    once()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    once()
                torch.cuda.synchronize()
                row[label] = round(1000 * (time.perf_counter() - start) / calls, 3)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8b,1b")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--arms", default="flash2,flash4,cudnn,cudnn-expanded")
    p.add_argument("--out", type=Path)
    p.add_argument("--host-cost", action="store_true", help="only the host's time a call, on tiny inputs")
    args = p.parse_args()
    arms = args.arms.split(",")
    rows = [row for shape in args.shapes.split(",")
            for row in (host_cost(shape, arms) if args.host_cost else check_shape(shape, args.seconds, arms))]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M")
        (args.out / f"attention-check-{stamp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
