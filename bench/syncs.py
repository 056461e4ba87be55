"""Where a training step of the studio's path makes the host wait for the GPU (CUDA only).

    python bench/syncs.py [--shape 1b] [--arm studio-qlora] [--steps 3]

After a warm-up, turns on PyTorch's CUDA sync debug mode for a few steps and counts each synchronising call
by the Python code that made it (the innermost frames of the studio, TRL, transformers, PEFT, bitsandbytes,
Liger, accelerate and torch.utils). Each such call drains the GPU's queue; where the host is the bottleneck,
the GPU then idles while the host issues the next work.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LIBRARIES = ("studio/", "trl/", "transformers/", "peft/", "bitsandbytes/", "liger_kernel/", "accelerate/",
             "torch/utils/", "torch/nn/", "bench/")


def where(stack) -> str:
    frames = [f for f in stack if any(part in f.filename for part in LIBRARIES)]
    return " <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames[::-1][:4])


def main() -> int:
    import torch
    from transformers import TrainerCallback

    from bench.bench import make_documents, run_studio
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b")
    p.add_argument("--arm", default="studio-qlora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    sites: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[where(traceback.extract_stack()[:-1])] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    class Watch(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
            elif state.global_step == args.warmup + args.steps:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown
                control.should_training_stop = True
            return control

    run_studio(args.shape, args.arm, make_documents(), seconds=1e9, extra_callbacks=(Watch(),))
    total = sum(sites.values())
    print(f"{args.shape} {args.arm}: {total} synchronising calls in {args.steps} steps "
          f"({total / args.steps:.1f} a step), by call site:")
    for site, count in sites.most_common():
        print(f"{count:5d}  {site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
