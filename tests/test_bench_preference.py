"""The preference bench (bench/preference.py) on the CPU with a tiny shape: its arms run, and the studio's DPO path,
its padding-free batches and stock TRL compute the same DPO loss. The GPU measurements need a CUDA machine."""

import itertools

import pytest

from bench import preference


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench's CPU children do: the tiny model's ops are too small to share out
    yield tmp_path
    torch.set_num_threads(threads)


def segment_attention(query, key, value, bounds, max_length, dropout, scale):
    """The variable-length flash kernel's result, sequence by sequence with SDPA (that kernel needs a GPU)."""
    import torch
    import torch.nn.functional as F
    cuts = bounds.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (query, key, value)),
                                                     is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
                      for s, e in itertools.pairwise(cuts)])


def test_dpo_arms_compute_the_same_loss_and_report(bench_home, monkeypatch):
    from studio.training.fast import varlen_attention
    monkeypatch.setattr(varlen_attention, "flash_varlen", segment_attention)
    stock = {**preference.run_dpo("tiny", False, "cpu", 0.1, {}), "shape": "tiny", "arm": "dpo-stock"}
    # The studio's DPO stage, padding-free as on a GPU (the variable-length kernel stood in for by SDPA per sequence)
    studio = {**preference.run_dpo("tiny", True, "cpu", 0.1, {"unpad": True}), "shape": "tiny", "arm": "dpo-studio"}
    assert stock["check"]["loss"] != pytest.approx(0.6931, abs=1e-4)  # the adapters were set: not the start's log 2
    assert studio["check"] == pytest.approx(stock["check"], rel=1e-4)
    assert studio["precomputed"] and studio["pairs_per_s_1_epoch"] < studio["pairs_per_s"]
    assert "padding-free" in studio["settings"] and not stock["precomputed"]
    rows = [stock, studio]
    preference.compare(rows)
    assert studio["check_vs_stock"]["loss"] < 1e-4 and studio["vs_stock"] > 0
    table = preference.dpo_table(rows)
    assert table.count("| tiny | dpo-") == 2 and "padding-free" in table


def test_grpo_arms_score_replies_alike_and_count_what_they_generate(bench_home):
    stock = {**preference.run_grpo("tiny", False, "cpu", 0.1, {}), "shape": "tiny", "arm": "grpo-stock"}
    # The studio's generation through the static cache and the decoding buffers, as on a GPU but without graphs
    studio = {**preference.run_grpo("tiny", True, "cpu", 0.1, {"decoding": "eager"}), "shape": "tiny",
              "arm": "grpo-studio"}
    assert stock["check"]["kl_mean"] > 0  # the adapters were set: the policy is not the reference
    assert studio["check"] == pytest.approx(stock["check"], rel=1e-4)
    assert stock["decoding"] == "off" and studio["decoding"] == "eager" and studio["decode_stats"]["replayed"] > 0
    assert studio["greedy"] == stock["greedy"] and len(stock["greedy"]) == 4  # the same greedy replies, token for token
    preference.compare([stock, studio])
    assert studio["greedy_vs_stock"] == 1.0 and "| 100% |" in preference.grpo_table([stock, studio])
    for arm in (stock, studio):
        assert arm["completions"] == preference.GRPO_BATCH * arm["steps"]
        assert 0 < arm["completion_tokens"] <= arm["completions"] * preference.TINY_COMPLETION_TOKENS
        assert 0 < arm["generation_share"] < 1 and arm["tokens"] > arm["completion_tokens"]


def test_pairs_fit_max_length_and_round_trip_through_the_tokenizer():
    tok = preference.tokenizer(512)
    pairs = preference.make_pairs(50, 512)
    longest = max(len(tok(p["prompt"] + r)["input_ids"]) for p in pairs for r in (p["chosen"], p["rejected"]))
    assert longest <= preference.DPO_MAX_LENGTH  # nothing is truncated: both arms train on the same tokens
    ids = tok(pairs[0]["prompt"])["input_ids"]
    assert tok.decode(ids) == pairs[0]["prompt"] and min(ids) >= 10
    assert pairs == preference.make_pairs(50, 512)  # seeded


def test_tables_from_rows():
    rows = [{"shape": "8b", "arm": "grpo-stock", "settings": "s", "completions_per_s": 2.0,
             "completion_tokens_per_s": 512, "tokens_per_s": 1000, "step_s_median": 8.0, "generation_share": 0.8,
             "peak_gib": 40, "check": {"logp_mean": -12.0, "kl_mean": 0.01}},
            {"shape": "8b", "arm": "grpo-studio", "settings": "p", "completions_per_s": 4.0,
             "completion_tokens_per_s": 1024, "tokens_per_s": 2000, "step_s_median": 4.0, "generation_share": 0.7,
             "peak_gib": 50, "check": {"logp_mean": -12.0012, "kl_mean": 0.01}},
            {"shape": "8b", "arm": "grpo-gen", "generation": {"a": {"seconds": 1.0, "completions": 16,
                                                                     "completion_tokens_per_s": 4096.0},
                                                               "b": {"error": "ValueError: no"}}},
            {"shape": "1b", "arm": "dpo-studio", "error": "out of memory"}]
    preference.compare(rows)
    assert rows[1]["vs_stock"] == 2.0 and rows[1]["check_vs_stock"]["logp_mean"] == pytest.approx(1e-4)
    text = preference.report(rows, {"device": "d", "versions": {}, "changes": {}})
    assert "| 8b | grpo-studio | p | 4.00 |" in text and "2.00x" in text and "failed: ValueError: no" in text
    assert "failed: out of memory" in text


def test_speed_plan_for_the_preference_and_rl_stages():
    """What the bench measured on the H200, as the plan decides it: DPO's right-padded rows take the flash kernel
    without a mask where it runs, GRPO (mostly generation) keeps the model's own kernels unless fused kernels are
    asked for, and the memory estimate counts a pair as two sequences and a GRPO row as a prompt and its reply."""
    from studio.shapes import ModelShape
    from studio.training.fast.plan import plan_speed, tokens_per_step
    from tests.conftest import machine, tiny_config
    shape = ModelShape(hidden=4096, layers=32, intermediate=14336, attention_width=4096, kv_width=1024, vocab=128256)
    gpu = machine(shape=shape, free_gib=139, varlen_ok=True, liger_installed=True, fused_rms_norm=True)
    sft = tiny_config("unused", data={"max_length": 1024})
    dpo = tiny_config("unused", stage="dpo", data={"max_length": 1024})
    grpo = tiny_config("unused", stage="grpo", data={"max_length": 512},
                       grpo={"num_generations": 8, "max_completion_length": 256})
    assert plan_speed(dpo, gpu).attention == "packed_varlen" and not plan_speed(dpo, gpu).packing
    assert plan_speed(dpo, machine(shape=shape, free_gib=139)).attention == "sdpa"  # the kernel does not run here
    assert plan_speed(dpo, machine("cpu")).attention == "sdpa"
    assert plan_speed(tiny_config("unused", stage="kto"), gpu).attention == "sdpa"  # KTO pads prompts on the left
    assert plan_speed(sft, gpu).attention == "packed_varlen" and plan_speed(sft, gpu).packing  # as before
    planned = plan_speed(grpo, gpu)
    assert not planned.liger and not planned.fused_norm and planned.fused_lora and planned.attention == "sdpa"
    assert any("Liger kernels: off for grpo" in reason for reason in planned.reasons)
    assert plan_speed(tiny_config("unused", stage="grpo", training={"fused_kernels": "on"}), gpu).liger
    assert plan_speed(dpo, gpu).liger and plan_speed(sft, gpu).liger
    assert tokens_per_step(dpo) == 2 * tokens_per_step(sft) == 2 * 8 * 1024
    assert tokens_per_step(grpo) == 8 * (512 + 256)
    rounded = tiny_config("unused", stage="grpo", training={"batch_size": 12}, grpo={"num_generations": 8})
    assert tokens_per_step(rounded) == 16 * (128 + 64)  # whole groups of 8, as the GRPO stage rounds the batch
    assert plan_speed(dpo, gpu).memory_estimate_gib > plan_speed(sft, gpu).memory_estimate_gib + 30
