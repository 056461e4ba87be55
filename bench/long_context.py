"""Longest single sequence the 8B shape trains on with QLoRA through the studio's path (CUDA only).

    python bench/long_context.py [--lengths 16384,32768,65536] [--shape 8b]

For each length: one document of that many tokens, batch 1, two optimizer steps through the studio's
trainer (the speed plan it picks: its attention kernel, gradient checkpointing for QLoRA, chunked LM head);
prints peak GPU memory and seconds per step, or the out-of-memory error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def try_length(shape: str, length: int) -> dict:
    import torch

    from bench.bench import LORA_ALPHA, LORA_R, PROJECTIONS, model_folder, studio_plan, tokenizer
    from studio import models
    from studio.config import from_dict
    from studio.records import Attempt
    from studio.rendering import EncodedSet
    from studio.runs import new_run
    from studio.stages import Job, sft
    from studio.training import loop
    from studio.training.fast import apply
    os.environ.setdefault("STUDIO_HOME", "/tmp/studio-bench/home")
    location = model_folder(shape, with_weights=True)
    cfg = from_dict({"name": f"long-{length}", "model": {"name_or_path": str(location)},
                     "data": {"max_length": length},
                     "method": {"method": "qlora", "rank": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                "target_modules": PROJECTIONS},
                     "training": {"batch_size": 1, "max_steps": 3, "save_steps": 1000000, "eval_steps": 1000000,
                                  "logging_steps": 1, "precision": "bf16"}})
    plan = studio_plan(cfg, location, {}, {})
    apply.before_model_load(plan, "cuda")
    model = models.load_model(str(location), dtype=torch.bfloat16, device="cuda", quantization="4bit",
                              **apply.model_load_options(plan))
    model = loop.add_adapters(model, cfg, "4bit", plan, torch.bfloat16)
    doc = torch.randint(10, 128000, (length,)).tolist()
    prep = loop.Prepared(cfg, tokenizer(), model, EncodedSet(rows=[{"input_ids": doc, "labels": doc}] * 3),
                         EncodedSet(), "cuda", torch.bfloat16, plan)
    run = new_run(cfg)
    trainer = sft.build(prep, Job(run, cfg, False, lambda: False), loop.arguments(prep, run, Attempt(1, 1)),
                        apply.trainer_callbacks(plan))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as err:
        return {"length": length, "ok": False, "error": str(err)[:200],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    torch.cuda.synchronize()
    return {"length": length, "ok": True, "seconds_for_3_steps": time.perf_counter() - start,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "plan": plan.summary()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16384,32768,65536")
    p.add_argument("--shape", default="8b")
    p.add_argument("--child", type=int)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(try_length(args.shape, args.child)), flush=True)
        return 0
    import subprocess
    for length in [int(x) for x in args.lengths.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--child", str(length)],
                              capture_output=True, text=True)
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        print(found[-1] if found else json.dumps({"length": length, "ok": False,
                                                  "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
