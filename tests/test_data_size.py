"""A 52,000-row alpaca file (the size of Stanford Alpaca) checked on the Data tab and trained, with the page
server's memory bounded (issue 17). Measured on a 2-core CPU machine: the check peaks at about 65 MB of Python
allocations for this 7 MB file and keeps nothing afterwards; the bounds below leave room above that."""

import gc
import json
import tracemalloc

import pytest

from tests.conftest import wait_until

ROWS = 52_000
CHECK_PEAK_MB = 150  # measured ~63 MB
KEPT_MB = 5  # measured ~0.2 MB
RUN_GROWTH_MB = 60


def alpaca_file(path):
    rows = [{"instruction": f"Give me fact number {i} about the number {i * 13}.", "input": "" if i % 3 else f"Ctx {i}",
             "output": f"Fact {i}: {i * 13} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(ROWS)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def rss_mb() -> float:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_52k_rows_checked_and_paged_with_bounded_memory_then_trained(tmp_path, tiny_model):
    from studio.service import Studio
    path = alpaca_file(tmp_path / "alpaca_52k.json")
    studio = Studio()
    studio.inspect_data({"path": "demo"}, str(tiny_model), "", page=0)  # imports and the tokenizer, once
    gc.collect()
    tracemalloc.start()
    shown = studio.inspect_data({"path": path, "max_length": 128}, str(tiny_model), "", page=0)
    last = studio.inspect_data({"path": path, "max_length": 128}, str(tiny_model), "", page=5199)
    _, peak = tracemalloc.get_traced_memory()
    del shown["lengths"]
    gc.collect()
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert f"{ROWS} usable of {ROWS} rows" in shown["summary"] and shown["pages"] == ROWS // 10
    # One page of rows goes to the browser, never the file; lengths are measured on a sample and said so.
    assert len(shown["preview"]) == 10 and len(last["preview"]) == 10 and last["preview"][0]["#"] == 51_991
    assert shown["estimated"] and len(last["lengths"]) == 2000
    assert peak / 2**20 < CHECK_PEAK_MB, f"the check peaked at {peak / 2**20:.0f} MB"
    assert kept / 2**20 < KEPT_MB + len(json.dumps(shown, default=str)) / 2**20

    before = rss_mb()
    started = studio.start({"model": {"name_or_path": str(tiny_model)},
                            "data": {"path": path, "max_length": 64, "eval_fraction": 0.001},
                            "method": {"method": "lora", "rank": 2, "alpha": 4},
                            "training": {"max_steps": 1, "batch_size": 2, "samples": 0, "forgetting_check": "off",
                                         "save_steps": 1, "eval_steps": 1}}, "")
    run_id = started["run_id"]

    def finished():
        snapshot = studio.snapshot(run_id, "")
        return None if snapshot["active"] else snapshot
    done = wait_until(finished, timeout=900, every=1.0)
    assert done["status"]["state"] == "completed", done["status"]
    summary = "\n".join(done["data_summary"])
    assert f"{ROWS} usable of {ROWS} rows" in summary and "alpaca format" in summary
    # Training runs in a worker process: the page server only reads the run folder.
    growth = rss_mb() - before
    print(f"check peak {peak / 2**20:.1f} MB, kept {kept / 2**20:.2f} MB, server growth during the run {growth:.1f} MB")
    assert growth < RUN_GROWTH_MB
