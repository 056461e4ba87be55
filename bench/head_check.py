"""The LM head alone on a GPU: the studio's kept-logits head (studio/training/fast/lm_head.py) against TRL's chunked
one, on the bench's head shapes, forward and backward. Prints one JSON line per shape: whether the per-token results
and the hidden states' gradient agree, and each head's median time and peak memory.

    python3 bench/head_check.py [--shapes 8190x4096,32760x2048] [--vocab 128256] [--calls 10]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def run_head(function, hidden, weight, labels, calls: int):
    """(results of the first call, median ms of `calls` forward+backward calls, peak GiB above the inputs)."""
    outputs = ("log_probs", "entropy", "is_top1")
    first = None
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls + 2):
        h = hidden.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        log_p, entropy, _, _, top1 = function.apply(h, weight, None, labels, 1.0, 32768, None, 1.0, outputs)
        (-log_p.sum() / len(labels)).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if first is None:
            first = (log_p.detach().float(), entropy.detach().float(), top1, h.grad.float())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return first, statistics.median(times[2:]), peak


def main() -> None:
    import trl.trainer.utils as trl_utils

    from studio.training.fast.lm_head import TRLHeadWithKeptLogits
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8190x4096,32760x2048", help="rows x hidden, comma-separated")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    trl_function = trl_utils._ChunkedLogProbFunction
    kept = TRLHeadWithKeptLogits(trl_function)
    for shape in args.shapes.split(","):
        rows, width = (int(x) for x in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=g)
        weight = (torch.randn(args.vocab, width, device="cuda", dtype=torch.bfloat16, generator=g) * width ** -0.5)
        labels = torch.randint(0, args.vocab, (rows,), device="cuda", generator=g)
        (trl_out, trl_ms, trl_peak) = run_head(trl_function, hidden, weight, labels, args.calls)
        (out, ms, peak) = run_head(kept, hidden, weight, labels, args.calls)
        names = ("log_probs", "entropy", "is_top1", "hidden_grad")
        diff = {}
        for name, a, b in zip(names, trl_out, out):
            diff[name] = (a != b).float().mean().item() if name == "is_top1" else (a - b).abs().max().item()
        scale = trl_out[3].abs().max().item()
        print("HEAD " + json.dumps({"rows": rows, "hidden": width, "vocab": args.vocab, "max_abs_difference": diff,
                                    "hidden_grad_max": scale, "trl_ms": round(trl_ms, 2),
                                    "trl_peak_gib": round(trl_peak, 2), "kept_ms": round(ms, 2),
                                    "kept_peak_gib": round(peak, 2), "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__}), flush=True)
        del hidden, weight, labels
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
