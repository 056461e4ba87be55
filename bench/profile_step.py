"""Where a training step of the studio's path spends its GPU time (CUDA only).

    python bench/profile_step.py [--shape 1b] [--arm studio] [--host] [--shapes] [--gaps]

Profiles 3 steps after the warm-up with torch.profiler and prints the kernels that took the most GPU
time, plus a rough split into matmuls, attention, elementwise/normalisation and the rest. With --shapes, the
operators (matmuls above all) are also grouped by their input shapes, with the GPU time of their kernels: a kernel's
name does not say which projection, or which pass, it ran for. With --gaps, where the GPU sat idle between kernels:
the gaps summed by the host operation that launched the kernel after each (implies --host; the profiler's own host
overhead widens them, so they are an upper bound).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from transformers import TrainerCallback

    from bench.bench import make_documents, run_studio
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b")
    p.add_argument("--arm", default="studio")
    p.add_argument("--host", action="store_true", help="also record the CPU side: where the host waits on the GPU")
    p.add_argument("--shapes", action="store_true", help="also group operators by input shape (implies --host)")
    p.add_argument("--gaps", action="store_true", help="also where the GPU idles between kernels (implies --host)")
    args = p.parse_args()
    args.host = args.host or args.shapes or args.gaps
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if args.host:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    prof = torch.profiler.profile(activities=activities, record_shapes=args.shapes)

    import time
    wall = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 8:
                torch.cuda.synchronize()
                wall["start"] = time.perf_counter()
                prof.start()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 11:
                torch.cuda.synchronize()
                wall["end"] = time.perf_counter()
                prof.stop()
                control.should_training_stop = True
            return control
    run_studio(args.shape, args.arm, make_documents(), seconds=1e9, extra_callbacks=(Profile(),))
    averages = prof.key_averages()
    if args.host:
        print_host_side(averages)
    if args.shapes:
        print_by_shape(prof)
    if args.gaps:
        print_gaps(prof)
    # Self time: with --host the CPU operators carry their kernels' time too, which would count it twice.
    events = [e for e in averages if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    # Attention first: FlashAttention's kernel names carry CUTLASS types ("cutlass::bfloat16_t"), which the matmul
    # keys would claim.
    groups = {"attention (flash, flex, cuDNN)": ("flash", "flex", "triton_tem", "attention", "cudnn", "fmha"),
              "matmul (gemm)": ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "matmul", "mm"),
              "triton fused (liger/inductor)": ("triton",), "elementwise/reduce": ("elementwise", "reduce",
                                                                                      "vectorized", "copy", "fill")}
    split = dict.fromkeys(groups, 0.0)
    split["other"] = 0.0
    for e in events:
        name = e.key.lower()
        for group, keys in groups.items():
            if any(k in name for k in keys):
                split[group] += e.self_device_time_total
                break
        else:
            split["other"] += e.self_device_time_total
    elapsed = (wall["end"] - wall["start"]) * 1e3
    print(f"3 steps: wall {elapsed:.1f} ms, GPU kernels {total / 1e3:.1f} ms "
          f"(GPU busy {100 * total / 1e3 / elapsed:.0f}% of wall; kernels may overlap)")
    for group, t in split.items():
        print(f"  {group:32} {100 * t / total:5.1f}%")
    print(f"{'kernel':90} {'ms':>9} {'%':>6} {'calls':>7}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        print(f"{e.key[:90]:90} {e.self_device_time_total / 1e3:9.2f} {100 * e.self_device_time_total / total:6.1f} "
              f"{e.count:7d}")
    return 0


def print_gaps(prof, smallest_us: float = 20.0) -> None:
    """GPU idle time between consecutive kernels (over `smallest_us`), by the innermost host operation that launched
    the kernel after the gap, and the largest single gaps with the kernels on either side."""
    import collections
    import json
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e),
                     key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "args" in e}
    import bisect
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            ops[e["tid"]].append(e)
    for found in ops.values():
        found.sort(key=lambda e: e["ts"])
    starts = {tid: [e["ts"] for e in found] for tid, found in ops.items()}

    def launcher(kernel) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "?"
        found = ops.get(launch["tid"], [])
        at = bisect.bisect_right(starts.get(launch["tid"], []), launch["ts"])
        for e in reversed(found[max(0, at - 300):at]):  # the latest-starting operation around the launch: innermost
            if e["ts"] + e["dur"] >= launch["ts"]:
                return e["name"]
        return launch["name"]
    by_op, largest, total = collections.Counter(), [], 0.0
    end = kernels[0]["ts"] + kernels[0].get("dur", 0) if kernels else 0
    for before, kernel in zip(kernels, kernels[1:]):
        gap = kernel["ts"] - end
        end = max(end, kernel["ts"] + kernel.get("dur", 0))
        if gap < smallest_us:
            continue
        total += gap
        name = launcher(kernel)
        by_op[name] += gap
        largest.append((gap, before["name"][:50], kernel["name"][:50], name))
    print(f"GPU gaps over {smallest_us:g} us (3 steps): {total / 1e3:.1f} ms; by the host operation launching the "
          "kernel after the gap:")
    for name, gap in by_op.most_common(25):
        print(f"  {gap / 1e3:8.2f} ms  {name[:90]}")
    print("largest gaps (us, kernel before, kernel after, launched by):")
    for gap, before, after, name in sorted(largest, reverse=True)[:25]:
        print(f"  {gap:9.0f}  {before:50} {after:50} {name[:60]}")


def print_by_shape(prof) -> None:
    """Operators by input shape, the GPU time of the kernels they launched (3 steps); matmuls first."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul")
            and e.device_time_total > 0]
    total = sum(e.device_time_total for e in rows)
    print(f"matmul operators by input shape (3 steps, {total / 1e3:.1f} ms of GPU time):")
    print(f"  {'operator':14} {'ms':>8} {'calls':>6} {'us/call':>8}  shapes")
    for e in sorted(rows, key=lambda e: -e.device_time_total)[:40]:
        print(f"  {e.key:14} {e.device_time_total / 1e3:8.2f} {e.count:6d} {e.device_time_total / e.count:8.1f}  "
              f"{e.input_shapes}")


def print_host_side(averages) -> None:
    """Host calls that wait for the GPU (each one drains the queue, and the GPU then idles while the host
    launches the next kernels), and the host-side operations that took the most time."""
    waits = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::item", "aten::_local_scalar_dense",
             "aten::nonzero", "aten::is_nonzero", "cudaEventSynchronize")
    print("host waits (3 steps):")
    for e in averages:
        if any(w in e.key for w in waits):
            print(f"  {e.key[:60]:60} calls {e.count:6d}  host {e.cpu_time_total / 1e3:9.1f} ms")
    print("top host operations by self time:")
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:25]:
        print(f"  {e.key[:60]:60} calls {e.count:6d}  self {e.self_cpu_time_total / 1e3:9.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
