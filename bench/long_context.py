"""Longest single sequence a shape trains on through the studio's path (CUDA only), under a memory limit.

    python bench/long_context.py [--lengths 16384,32768,65536] [--shape 8b] [--method qlora] [--limit GIB]
                                 [--steps 3] [--plan FIELD=VALUE ...] [--out DIR]

For each length: one document of that many tokens, batch 1, `--steps` optimizer steps through the studio's trainer
with the speed plan it picks for that length and `training.memory_limit_gib` (--limit; 0: none). Prints, per length,
the peak GPU memory, the seconds of each step (the first includes warm-up; the median is over the rest), the plan's
summary and its memory reasons, or the out-of-memory error. Each length runs in its own process. With --out, the
results are also written there as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def try_length(shape: str, method: str, length: int, limit: float, steps: int, plan_changes: dict) -> dict:
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
    os.environ.setdefault("STUDIO_HOME", "/tmp/studio-bench/home")
    quantization = quantization_for(method)
    location = model_folder(shape, with_weights=quantization is not None)
    cfg = from_dict({"name": f"long-{length}", "model": {"name_or_path": str(location)},
                     "data": {"max_length": length},
                     "method": {"method": method, "rank": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                "target_modules": PROJECTIONS},
                     "training": {"batch_size": 1, "max_steps": steps, "save_steps": 1000000, "eval_steps": 1000000,
                                  "logging_steps": 1, "precision": "bf16", "memory_limit_gib": limit}})
    plan = studio_plan(cfg, location, plan_changes, {})
    apply.before_model_load(plan, "cuda")
    if quantization:
        model = models.load_model(str(location), dtype=torch.bfloat16, device="cuda", quantization=quantization,
                                  **apply.model_load_options(plan))
    else:
        model = build_model(shape)
        model.set_attn_implementation(plan.attention)
    model = loop.add_adapters(model, cfg, quantization, plan, torch.bfloat16)
    doc = torch.randint(10, 128000, (length,)).tolist()
    prep = loop.Prepared(cfg, tokenizer(), model, EncodedSet(rows=[{"input_ids": doc, "labels": doc}] * steps),
                         EncodedSet(), "cuda", torch.bfloat16, plan)
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

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = sft.build(prep, Job(run, cfg, False, lambda: False), loop.arguments(prep, run, Attempt(1, 1)),
                        [StepTimes(), *apply.trainer_callbacks(plan)])
    torch.cuda.reset_peak_memory_stats()
    memory = [r for r in plan.reasons if r.startswith(("checkpointing", "offloaded", "MLP"))]
    base = {"length": length, "shape": shape, "method": method, "limit_gib": limit, "plan": plan.summary(),
            "reasons": memory, "estimate_gib": plan.memory_estimate_gib,
            "changes": plan_changes}
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as err:
        return {**base, "ok": False, "error": str(err)[:300], "step_s": times,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        apply.finish(plan)
    torch.cuda.synchronize()
    rest = sorted(times[1:]) or times
    return {**base, "ok": True, "step_s": [round(t, 2) for t in times], "step_s_median": rest[len(rest) // 2],
            "tokens_per_s": length / rest[len(rest) // 2], "losses": losses,
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
    p.add_argument("--out", default="")
    p.add_argument("--child", type=int)
    args = p.parse_args()
    changes = parse_changes(args.plan)
    if args.child:
        result = try_length(args.shape, args.method, args.child, args.limit, args.steps, changes)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    for length in [int(x) for x in args.lengths.split(",")]:
        command = [sys.executable, __file__, "--shape", args.shape, "--method", args.method, "--limit",
                   str(args.limit), "--steps", str(args.steps), "--child", str(length)]
        for item in args.plan:
            command += ["--plan", item]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        line = found[-1] if found else json.dumps({"length": length, "limit_gib": args.limit, "ok": False,
                                                   "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
        print(line, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "long_context.jsonl", "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
