"""One LoRA MLP alone on a GPU: the studio's one-node LoRA MLP (studio/training/fast/lora_mlp.py) against the same MLP
with each projection fused on its own (fused_lora.py) and Liger's SwiGLU between them, as the 8B step runs it without
the one node. Forward and backward of one decoder layer's MLP; prints one JSON line per kernel tiling: whether the
output and the gradients agree with the per-projection path, and the median time of each.

    python3 bench/mlp_check.py [--tokens 8192] [--hidden 4096] [--intermediate 14336] [--rank 16] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import types

import torch

TILINGS = ((16, 128, 4), (32, 128, 4), (16, 128, 8))


def one_mlp(hidden: int, intermediate: int, rank: int):
    """A one-layer bf16 Llama on the GPU with LoRA (B non-zero) on every projection, each fused on its own."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.training.fast.fused_lora import fuse_lora_layers
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=hidden // 128, num_key_value_heads=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    fuse_lora_layers(model)
    mlp = model.base_model.model.model.layers[0].mlp
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
        mlp.forward = types.MethodType(LigerSwiGLUMLP.forward, mlp)
        liger = True
    except ImportError:
        liger = False
    return model, mlp, liger


def run(mlp, x, calls: int):
    """(output, input gradient, LoRA gradients of the first call, median ms of `calls` forward+backward calls)."""
    params = [p for p in mlp.parameters() if p.requires_grad]
    first, times = None, []
    for _ in range(calls + 3):
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = mlp(xi)
        out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if first is None:
            first = (out.detach().float(), xi.grad.float(), [p.grad.float() for p in params])
    return first, statistics.median(times[3:])


def kernels(mlp, x, title: str, calls: int = 5) -> None:
    """The GPU kernels of `calls` forward+backward calls, by total time (the top 14), in microseconds a call."""
    from torch.profiler import ProfilerActivity, profile
    run(mlp, x, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            xi = x.detach().requires_grad_(True)
            out = mlp(xi)
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:14]
    print(f"-- {title}: " + "; ".join(f"{e.key[:60]} x{e.count // calls} {e.device_time_total / calls:.0f}us"
                                      for e in rows), flush=True)


def difference(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="also print each path's kernels (first tiling)")
    args = p.parse_args()
    from studio.training.fast import lora_mlp
    model, mlp, liger = one_mlp(args.hidden, args.intermediate, args.rank)
    x = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    (ref_out, ref_dx, ref_grads), ref_ms = run(mlp, x, args.calls)
    if args.profile:
        kernels(mlp, x, "per projection")
    assert lora_mlp.fuse_lora_mlps(model) == 1
    for block_m, block_n, warps in TILINGS:
        lora_mlp.BLOCK_M, lora_mlp.BLOCK_N, lora_mlp.NUM_WARPS = block_m, block_n, warps
        (out, dx, grads), ms = run(mlp, x, args.calls)
        if args.profile and (block_m, block_n, warps) == TILINGS[0]:
            kernels(mlp, x, "one node")
        print(json.dumps({"tokens": args.tokens, "hidden": args.hidden, "intermediate": args.intermediate,
                          "rank": args.rank, "tiling": [block_m, block_n, warps],
                          "liger_between": liger,
                          "per_projection_ms": round(ref_ms, 3), "one_node_ms": round(ms, 3),
                          "output_difference": difference(out, ref_out), "input_grad_difference": difference(dx, ref_dx),
                          "lora_grad_difference": max(difference(g, r) for g, r in zip(grads, ref_grads))}),
              flush=True)


if __name__ == "__main__":
    main()
