"""Longest single sequence a shape trains on through the studio's path (CUDA only), under a memory limit.

    python bench/long_context.py [--lengths 16384,32768,65536] [--shape 8b] [--method qlora] [--limit GIB]
                                 [--steps 3] [--plan FIELD=VALUE ...] [--setup-apart] [--pin-ahead] [--out DIR]
                                 [--row-tokens N --batch B]

For each length: one document of that many tokens, batch 1, `--steps` optimizer steps through the studio's trainer
with the speed plan it picks for that length and `training.memory_limit_gib` (--limit; 0: none). Prints, per length,
the peak GPU memory, the seconds of each step (the first includes warm-up; the median is over the rest), the plan's
summary and its memory reasons, or the out-of-memory error. Each length runs in its own process. With --out, the
results are also written there as JSON lines.

With --setup-apart, one forward and backward of the attention function the model calls, at the full length and in
the layout the model hands it, runs and is timed before the steps (`setup_s`; cuDNN builds its plan for a shape on
its first call). With --pin-ahead, the offloaded layers' host buffers are pinned there too, at their full size (on the
H200's host, 98 GB pinned before training left the run killed once its trainer started; pinned in the first step, as
runs do, it trained). Either way `pin_s_in_steps` is the host time the steps spent pinning: the GPU may have gone on
with queued work meanwhile, so a first step's time less it is a lower bound for a later step, and the first step
itself an upper one (it also holds the allocator's first requests and kernels compiled on first use). At lengths where
one step takes minutes this is how a steady step is bounded within one device call.

With --row-tokens N the length is data.max_length only: the data is rows of N tokens each, --batch B of them a
micro-batch, unpacked (padded to the longest in the batch), and the plan reads the rows' lengths as a run's set-up does
(plan.data_lengths). The result then also gives the plan made without them (`plan_without_data`), to set the peak
against both estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def set_up_ahead(model, plan, length: int, pin: bool) -> dict:
    """Call the attention once at `length` (and pin the offloaded layers' host buffers, `pin`), timed apart."""
    import torch

    from studio.training.fast import activations
    from studio.training.fast.varlen_attention import varlen_attention_forward
    config = model.config
    out = {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    if plan.offloaded_layers and pin:
        out["pinned_gb"] = round(activations.pin_host_buffers(model, length, torch.bfloat16) / 1e9, 2)
    out["pin_s"] = round(time.perf_counter() - start, 2)
    if plan.attention == "packed_varlen":
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

        def made(n):  # (1 x heads x tokens x d), a transposed view, as the model's attention gets it after RoPE
            return torch.randn((1, length, n, head_dim), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        query, key, value = (made(n).requires_grad_(True) for n in (heads, kv_heads, kv_heads))
        bounds = torch.tensor([0, length], device="cuda", dtype=torch.int32)
        torch.cuda.synchronize()
        start = time.perf_counter()
        result, _ = varlen_attention_forward(None, query, key, value, None, 0.0, head_dim ** -0.5,
                                             cu_seq_lens_q=bounds, max_length_q=length)
        result.sum().backward()
        torch.cuda.synchronize()
        out["attention_first_call_s"] = round(time.perf_counter() - start, 2)
        del query, key, value, result
        torch.cuda.empty_cache()
    return out


def try_length(shape: str, method: str, length: int, limit: float, steps: int, plan_changes: dict,
               setup_apart: bool = False, pin_ahead: bool = False, row_tokens: int = 0, batch: int = 1) -> dict:
    import torch
    from transformers import TrainerCallback

    from bench.bench import LORA_ALPHA, LORA_R, PROJECTIONS, build_model, model_folder, studio_plan, tokenizer
    from studio import models
    from studio.config import from_dict
    from studio.methods import quantization_for
    from studio.records import Attempt
    from studio.rendering import EncodedSet
    from studio.runs import new_run
    from studio.stages import Job, sft
    from studio.training import loop
    from studio.training.fast import apply
    from studio.training.fast.plan import data_lengths
    os.environ.setdefault("STUDIO_HOME", "/tmp/studio-bench/home")
    quantization = quantization_for(method)
    location = model_folder(shape, with_weights=quantization is not None)
    training = {"batch_size": batch, "max_steps": steps, "save_steps": 1000000, "eval_steps": 1000000,
                "logging_steps": 1, "precision": "bf16", "memory_limit_gib": limit}
    if row_tokens:
        training["packing"] = "off"
    cfg = from_dict({"name": f"long-{length}", "model": {"name_or_path": str(location)},
                     "data": {"max_length": length},
                     "method": {"method": method, "rank": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                "target_modules": PROJECTIONS},
                     "training": training})
    docs = [torch.randint(10, 128000, (row_tokens or length,)).tolist() for _ in range(batch * steps)]
    rows = [{"input_ids": doc, "labels": doc} for doc in docs]
    plan = studio_plan(cfg, location, plan_changes, {}, data_lengths(rows) if row_tokens else None)
    without_data = {}
    if row_tokens:
        assumed = studio_plan(cfg, location, plan_changes, {})
        without_data = {"summary": assumed.summary(), "estimate_gib": assumed.memory_estimate_gib,
                        "micro_batch_tokens": assumed.micro_batch_tokens}
    apply.before_model_load(plan, "cuda")
    if quantization:
        model = models.load_model(str(location), dtype=torch.bfloat16, device="cuda", quantization=quantization,
                                  **apply.model_load_options(plan))
    else:
        model = build_model(shape)
        model.set_attn_implementation(plan.attention)
    model = loop.add_adapters(model, cfg, quantization, plan, torch.bfloat16)
    prep = loop.Prepared(cfg, tokenizer(), model, EncodedSet(rows=rows), EncodedSet(), "cuda", torch.bfloat16, plan)
    run = new_run(cfg)
    times: list[float] = []
    losses: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            print(f"step {len(times)}: {times[-1]:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
                  file=sys.stderr, flush=True)  # seen even where the process is stopped before its result

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = sft.build(prep, Job(run, cfg, False, lambda: False), loop.arguments(prep, run, Attempt(batch, 1)),
                        [StepTimes(), *apply.trainer_callbacks(plan)])
    setup = set_up_ahead(trainer.model, plan, length, pin_ahead) if setup_apart or pin_ahead else {}
    from studio.training.fast import activations
    pinned_before = activations.pinning_seconds
    if setup:
        print(f"set-up: {setup}", file=sys.stderr, flush=True)
    torch.cuda.reset_peak_memory_stats()
    memory = [r for r in plan.reasons if r.startswith(("memory estimate", "checkpointing", "offloaded", "MLP",
                                                         "input embeddings"))]
    base = {"length": length, "shape": shape, "method": method, "limit_gib": limit, "plan": plan.summary(),
            "reasons": memory, "estimate_gib": plan.memory_estimate_gib, "micro_batch_tokens": plan.micro_batch_tokens,
            "changes": plan_changes, "setup_s": setup}
    if row_tokens:
        base.update(row_tokens=row_tokens, batch=batch, plan_without_data=without_data)
    tokens = batch * (row_tokens or length)
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as err:
        traceback.print_exc()  # into the child's log: where in the step memory ran out
        return {**base, "ok": False, "error": str(err)[:300], "step_s": times,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        apply.finish(plan)
    torch.cuda.synchronize()
    rest = sorted(times[1:]) or times
    return {**base, "ok": True, "step_s": [round(t, 2) for t in times],
            "pin_s_in_steps": round(activations.pinning_seconds - pinned_before, 2),
            "step_s_median": rest[len(rest) // 2],
            "tokens_per_s": tokens / rest[len(rest) // 2], "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def main() -> int:
    from bench.bench import parse_changes
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16384,32768,65536")
    p.add_argument("--shape", default="8b")
    p.add_argument("--method", default="qlora")
    p.add_argument("--limit", type=float, default=0.0, help="training.memory_limit_gib (0: none)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--setup-apart", action="store_true", help="call the attention once before the steps, timed")
    p.add_argument("--pin-ahead", action="store_true", help="pin the offloaded layers' host buffers before the steps")
    p.add_argument("--row-tokens", type=int, default=0, help="rows of this many tokens, max_length the length")
    p.add_argument("--batch", type=int, default=1, help="with --row-tokens: rows a micro-batch")
    p.add_argument("--out", default="")
    p.add_argument("--child", type=int)
    args = p.parse_args()
    changes = parse_changes(args.plan)
    if args.child:
        result = try_length(args.shape, args.method, args.child, args.limit, args.steps, changes, args.setup_apart,
                            args.pin_ahead, args.row_tokens, args.batch)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    for length in [int(x) for x in args.lengths.split(",")]:
        command = [sys.executable, __file__, "--shape", args.shape, "--method", args.method, "--limit",
                   str(args.limit), "--steps", str(args.steps), "--child", str(length)]
        for item in args.plan:
            command += ["--plan", item]
        command += ["--setup-apart"] * args.setup_apart + ["--pin-ahead"] * args.pin_ahead
        command += ["--row-tokens", str(args.row_tokens), "--batch", str(args.batch)]
        # The child's log goes to a file under --out as it runs: a run stopped from outside (a device call's time
        # limit) still leaves its set-up and step times there.
        log = Path(args.out) / f"long-{length}.log" if args.out else None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") if log is not None else open(os.devnull, "w") as err:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err if log is not None else subprocess.PIPE,
                                  text=True)
        errors = log.read_text() if log is not None else done.stderr
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        # A negative exit code is the signal that ended the child (-9: killed, e.g. for host memory).
        line = found[-1] if found else json.dumps({"length": length, "limit_gib": args.limit, "ok": False,
                                                   "exit_code": done.returncode,
                                                   "error": (errors.strip().splitlines() or ["?"])[-1][:300]})
        print(line, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "long_context.jsonl", "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
