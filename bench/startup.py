"""Start-to-first-step: how long from pressing Start until the first training step is logged, for a run in a
fresh worker process (studio train), in the spare worker the page's server keeps ready, and in a thread of a
process that has already imported torch, transformers and TRL (how the page's runs used to start).

    python bench/startup.py [--repeat 3]

The bundled model on the demo preset, one step, on this machine's CPU. Each measurement runs in a fresh
studio home (the model cache is shared, so no conversion is timed). Prints a table and writes
bench/results/startup-<time>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _config():
    from studio.paths import PRESETS_DIR
    from studio.presets import load_run_config
    return load_run_config(PRESETS_DIR / "demo.yaml", ["training.max_steps=2", "training.eval_steps=1000",
                                                      "training.save_steps=1000", "name=startup"])


def _first_step(run, timeout: float = 900) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(m.is_training for m in run.metrics()):
            return time.perf_counter()
        time.sleep(0.02)
    raise RuntimeError(f"no step logged: {run.status().message}")


def worker_process() -> float:
    from studio import launcher
    started = time.perf_counter()
    launched = launcher.start(_config())
    first = _first_step(launched.run)
    launcher.stop(launched.run)
    launcher.wait(launched, 900)
    return first - started


def spare_worker() -> float:
    """As the page's server starts a run: the spare worker it keeps has imported the libraries already."""
    from studio import launcher, slot
    launcher.keep_spare_ready()
    log = slot.lock_path().with_name("spare-worker.log")
    end = time.monotonic() + 300
    while not (log.is_file() and "ready" in log.read_text()) and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(1.0)  # the page would have been open for a while: let the machine settle
    try:
        return worker_process()
    finally:
        launcher.close_spare()


def thread_in_warm_process() -> float:
    from studio.runs import new_run
    from studio.training.worker import execute
    started = time.perf_counter()
    run = new_run(_config())
    stop = threading.Event()
    thread = threading.Thread(target=execute, args=(run, False, stop.is_set))
    thread.start()
    first = _first_step(run)
    stop.set()
    thread.join()
    return first - started


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("STUDIO_MODEL_CACHE", str(ROOT / ".studio-test-cache" / "models"))
    from studio import models
    models.resolve("bundled")  # converted once, outside the timings
    # The warm process: what the page's server had imported by the time a person pressed Start.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    arms = {"fresh worker process (studio train)": worker_process,
            "spare worker process (the page's Start)": spare_worker,
            "thread of a process with the libraries imported (the page's Start before)": thread_in_warm_process}
    os.environ["STUDIO_SPARE_WORKER"] = "1"
    results: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeat):  # in turn, so a slow spell of the machine does not hit one arm only
        for name, arm in arms.items():
            os.environ["STUDIO_HOME"] = tempfile.mkdtemp(prefix="studio-startup-")
            results[name].append(arm())
            print(f"{name}: {results[name][-1]:.1f} s", flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    lines = [f"Start to first logged step, bundled SmolLM2-135M, demo preset, CPU ({machine})", "",
             "| how the run starts | median s | runs (s) |", "|---|---|---|"]
    for name, times in results.items():
        lines.append(f"| {name} | {statistics.median(times):.1f} | {', '.join(f'{t:.1f}' for t in times)} |")
    fresh, spare, thread = (statistics.median(v) for v in results.values())
    lines += ["", f"Against a thread: a fresh worker process adds {fresh - thread:.1f} s (median) before the first "
              f"step, a spare one {spare - thread:.1f} s."]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"startup-{datetime.datetime.now():%Y%m%d-%H%M}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
