"""The benchmark's summary of repeated runs (the GPU runs themselves need a CUDA machine)."""

from bench.bench import combine, qlora_ratios


def _row(arm: str, tokens_per_s: float, peak: float = 10.0) -> dict:
    return {"shape": "8b", "arm": arm, "tokens_per_s": tokens_per_s, "mfu": tokens_per_s / 1e5, "peak_gib": peak}


def test_repeats_report_the_median_run_every_speed_and_the_highest_peak():
    row = combine([_row("studio-qlora", 9000, 10.4), _row("studio-qlora", 9500, 10.6),
                   {"shape": "8b", "arm": "studio-qlora", "error": "out of memory"}, _row("studio-qlora", 9100)])
    assert row["tokens_per_s"] == 9100 and row["mfu"] == 9100 / 1e5  # the median run, its MFU with it
    assert row["repeats"] == [9000, 9500, 9100] and row["failed_repeats"] == 1
    assert row["peak_gib"] == 10.6
    assert combine([_row("studio", 100), _row("studio", 300)])["tokens_per_s"] == 100  # even count: the lower
    assert "error" in combine([{"shape": "8b", "arm": "studio", "error": "x"}])


def test_qlora_share_of_lora_per_shape():
    rows = [_row("studio", 15000), _row("studio-qlora", 9100), {**_row("studio", 70000), "shape": "1b"}]
    assert qlora_ratios(rows) == ["8b: QLoRA at 60.7% of LoRA bf16's tokens/s"]


def test_several_gpus_report_their_scaling_against_one():
    from bench.bench import scaling, scaling_table
    one = {**_row("studio", 10_000, 40.0), "gpus": 1}
    four = {**_row("studio", 36_000, 30.0), "gpus": 4, "plan": {"strategy": "ddp"}}
    done = scaling(one, four)
    assert done["scaling"] == 0.9 and done["one_gpu_tokens_per_s"] == 10_000
    text = scaling_table([done, {"shape": "8b", "arm": "studio-qlora", "gpus": 4, "error": "out of memory"}])
    assert "| 8b | studio | 4 | ddp | 36,000 | 10,000 | 90.0% |" in text and "failed: out of memory" in text
    assert "scaling" not in scaling(one, {"shape": "8b", "arm": "studio", "gpus": 4, "error": "x"})
