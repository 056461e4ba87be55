"""Variable-length flash attention for packed rows: the packed documents stay apart, the plan picks it only
where the kernel runs, and a full run trains and saves through it.

The kernel itself is CUDA only. On the CPU it is replaced by a reference (per-document causal SDPA) that takes
the same (tokens x heads x head_dim) layout and sequence boundaries, so what is tested here is everything
around it: the boundaries from the collator reaching every layer, the layouts in and out, the fallbacks.
The test marked `cuda` checks the real kernel against the same reference; it runs on the GPU machine
(bench/NOTES.md says when it last ran)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from studio.training.fast import varlen_attention  # noqa: E402

varlen_attention.register()
from tests.conftest import tiny_config  # noqa: E402


def per_document_attention(query, key, value, cu_seq_lens, max_length, dropout, scale):
    """What the kernel must compute, one document at a time (grouped-query heads repeated)."""
    out = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.fixture()
def reference_kernel(monkeypatch):
    calls = []

    def kernel(query, key, value, cu_seq_lens, max_length, dropout, scale):
        calls.append((tuple(query.shape), cu_seq_lens.tolist(), max_length))
        return per_document_attention(query, key, value, cu_seq_lens, max_length, dropout, scale)
    monkeypatch.setattr(varlen_attention, "flash_varlen", kernel)
    return calls


def _tiny_llama(attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    return model


def _documents_loss(model, docs):
    """Each document on its own through SDPA: what a packed row must reproduce."""
    model.set_attn_implementation("sdpa")
    losses = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs]
    model.set_attn_implementation(varlen_attention.NAME)
    return sum(losses) / sum(len(d) - 1 for d in docs)


def test_packed_documents_stay_apart_in_every_layer(reference_kernel):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    model = _tiny_llama(varlen_attention.NAME)
    docs = [list(range(3, 14)), list(range(20, 27)), list(range(40, 58))]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)
    batch = collator([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape == (1, 36)
    # The first token of each document has no label in a packed row, so compare with labels masked alike.
    packed_loss = model(**batch).loss
    reference = _documents_loss(model, docs)
    torch.testing.assert_close(packed_loss, reference, rtol=1e-5, atol=1e-6)
    # Each layer's attention got the collator's boundaries and the whole row as one sequence of tokens.
    assert reference_kernel == [((36, 4, 8), [0, 11, 18, 36], 18)] * 2


def test_packed_gradients_match_per_document_training(reference_kernel):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    docs = [list(range(5, 30)), list(range(31, 40))]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)
    packed, separate = _tiny_llama(varlen_attention.NAME), _tiny_llama("sdpa")
    packed(**collator([{"input_ids": d} for d in docs])).loss.backward()
    total = sum(len(d) - 1 for d in docs)
    for d in docs:
        (separate(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) / total).backward()
    for (name, p), q in zip(packed.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_forward_without_boundaries_is_one_causal_sequence_per_row(reference_kernel):
    model = _tiny_llama(varlen_attention.NAME)
    ids = torch.randint(3, 97, (2, 9))
    out = model(input_ids=ids).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out, model(input_ids=ids).logits)
    assert reference_kernel == []  # no boundaries given: the kernel is not involved


def test_generation_with_a_cache_says_what_to_do(reference_kernel):
    model = _tiny_llama(varlen_attention.NAME)
    with pytest.raises(ValueError, match="sdpa"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)


def test_supported_only_where_the_kernel_computes_the_same_attention():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    llama = LlamaConfig(hidden_size=4096, num_attention_heads=32)
    assert varlen_attention.supported(llama, (9, 0), torch.bfloat16)
    assert varlen_attention.supported(llama, (8, 0), torch.float16)
    assert not varlen_attention.supported(llama, (7, 5), torch.float16)  # Turing (T4): no flash kernel
    assert not varlen_attention.supported(llama, None, torch.bfloat16)  # CPU
    assert not varlen_attention.supported(llama, (9, 0), torch.float32)
    assert not varlen_attention.supported(LlamaConfig(hidden_size=4096, num_attention_heads=8), (9, 0),
                                          torch.bfloat16)  # head size 512
    assert not varlen_attention.supported(MistralConfig(sliding_window=4096), (9, 0), torch.bfloat16)
    assert varlen_attention.supported(MistralConfig(sliding_window=None), (9, 0), torch.bfloat16)
    assert varlen_attention.supported(Qwen2Config(use_sliding_window=False), (9, 0), torch.bfloat16)
    assert not varlen_attention.supported(Qwen2Config(use_sliding_window=True, sliding_window=1024,
                                                      max_window_layers=0), (9, 0), torch.bfloat16)


def test_plan_picks_varlen_only_where_it_runs(tiny_model):
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine
    cfg = tiny_config(tiny_model, data={"max_length": 4096}, training={"batch_size": 2})
    assert plan_speed(cfg, machine("cuda", "llama", varlen_ok=True)).attention == varlen_attention.NAME
    assert plan_speed(cfg, machine("cuda", "llama", varlen_ok=False)).attention == "flex_attention"
    assert plan_speed(cfg, machine("cuda", "gemma2", varlen_ok=True)).attention == "flex_attention"
    assert plan_speed(cfg, machine("cpu", "llama", varlen_ok=True)).attention == "sdpa"
    unpacked = tiny_config(tiny_model, training={"packing": "off"})
    assert plan_speed(unpacked, machine("cuda", "llama", varlen_ok=True)).attention == "sdpa"
    # Asked for by name where it cannot run: the plan says why and uses what can.
    asked = tiny_config(tiny_model, training={"attention": varlen_attention.NAME, "packing": "on"})
    assert plan_speed(asked, machine("cuda", "llama", varlen_ok=True)).attention == varlen_attention.NAME
    older_gpu = plan_speed(asked, machine("cuda", "llama", varlen_ok=False))
    assert older_gpu.attention == "flex_attention" and "Ampere" in " ".join(older_gpu.reasons)
    assert plan_speed(asked, machine("cpu", "llama", varlen_ok=False)).attention == "sdpa"


def test_a_run_trains_and_saves_through_varlen_attention(tiny_model, reference_kernel, monkeypatch):
    from studio.records import State
    from studio.runs import new_run
    from tests.conftest import train_here
    # The reference kernel stands in for the GPU's, so the plan may pick it here.
    monkeypatch.setattr(varlen_attention, "supported", lambda *args: True)
    monkeypatch.setattr(varlen_attention, "kernel_runs", lambda *args: True)
    run = new_run(tiny_config(tiny_model, training={"packing": "on", "attention": varlen_attention.NAME,
                                                    "max_steps": 4, "eval_steps": 2}))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert status.plan["attention"] == varlen_attention.NAME
    assert reference_kernel and all(len(bounds) > 2 for _, bounds, _ in reference_kernel)  # packed rows
    losses = [m.loss for m in run.metrics() if m.is_training]
    held_out = [m.eval_loss for m in run.metrics() if m.is_evaluation]  # evaluation goes through it too
    assert losses and held_out and all(0 < x < 100 for x in losses + held_out)  # finite, not NaN
    from studio.inference import load_chat_model, reply
    chat = load_chat_model("adapter", run.id)  # the chat loads its own model; this attention stays in training
    assert isinstance(reply(chat, "Hello", max_new_tokens=4), str)


def test_without_a_gpu_the_kernel_probe_says_no():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert varlen_attention.kernel_runs(64, torch.bfloat16) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel runs on NVIDIA GPUs only")
def test_kernel_probe_on_the_gpu():
    assert varlen_attention.kernel_runs(128, torch.bfloat16) and varlen_attention.kernel_runs(64, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernel runs on NVIDIA GPUs only")
@pytest.mark.parametrize("layout", ["heads-major", "tokens-major"])
def test_flash_kernel_matches_per_document_attention_on_the_gpu(layout):
    torch.manual_seed(0)
    bounds = torch.tensor([0, 700, 713, 2000, 2048], dtype=torch.int32, device="cuda")
    shapes = {"q": (1, 8, 2048, 128), "kv": (1, 2, 2048, 128)}  # grouped-query: 4 query heads per key head

    def make(shape):
        if layout == "heads-major":  # as transformers' own RoPE leaves them
            return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        batch, heads, tokens, dim = shape  # as Liger's RoPE and the projections leave them
        return torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2) \
            .detach().requires_grad_(True)
    q, k, v = make(shapes["q"]), make(shapes["kv"]), make(shapes["kv"])
    out, _ = varlen_attention.varlen_attention_forward(None, q, k, v, None, scaling=128 ** -0.5,
                                                       cu_seq_lens_q=bounds, max_length_q=1287)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference = per_document_attention(q.transpose(1, 2)[0].float(), k.transpose(1, 2)[0].float(),
                                       v.transpose(1, 2)[0].float(), bounds, 1287, 0.0, 128 ** -0.5).unsqueeze(0)
    reference.backward(grad.float())
    expected = [reference.detach()] + [t.grad for t in (q, k, v)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.fixture()
def fake_flash4(monkeypatch):
    """FlashAttention-4's interface module as the studio calls it, computing the per-document reference (the real
    kernels need a Hopper or Blackwell GPU). Records each call's arguments."""
    import sys
    import types
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               softmax_scale=None, causal=False, **rest):
        calls.append({"shape": tuple(q.shape), "bounds_q": cu_seqlens_q.tolist(), "bounds_k": cu_seqlens_k.tolist(),
                      "max_q": max_seqlen_q, "max_k": max_seqlen_k, "scale": softmax_scale, "causal": causal,
                      "rest": rest})
        out = per_document_attention(q, k, v, cu_seqlens_q, max_seqlen_q, 0.0, softmax_scale)
        return out, torch.zeros(q.shape[1], q.shape[0])
    interface = types.ModuleType("flash_attn.cute.interface")
    interface.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(varlen_attention, "_cache_compiled_kernels", lambda: None)
    monkeypatch.setattr(varlen_attention, "_flash4", True)
    return calls


def test_flash4_keeps_packed_documents_apart(fake_flash4, reference_kernel):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    model = _tiny_llama(varlen_attention.NAME)
    docs = [list(range(3, 14)), list(range(20, 27)), list(range(40, 58))]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)
    packed_loss = model(**collator([{"input_ids": d} for d in docs])).loss
    torch.testing.assert_close(packed_loss, _documents_loss(model, docs), rtol=1e-5, atol=1e-6)
    assert reference_kernel == []  # FlashAttention-2 not called
    scale = model.config.head_dim ** -0.5 if getattr(model.config, "head_dim", None) else 8 ** -0.5
    assert fake_flash4 == [{"shape": (36, 4, 8), "bounds_q": [0, 11, 18, 36], "bounds_k": [0, 11, 18, 36],
                            "max_q": 18, "max_k": 18, "scale": scale, "causal": True, "rest": {}}] * 2


def test_flash4_has_no_dropout_so_attention_dropout_stays_on_flash2(fake_flash4, reference_kernel):
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    bounds = torch.tensor([0, 5, 12], dtype=torch.int32)
    varlen_attention.varlen_attention_forward(None, q, k, k, None, dropout=0.1, cu_seq_lens_q=bounds, max_length_q=7)
    assert fake_flash4 == [] and len(reference_kernel) == 1
    varlen_attention.varlen_attention_forward(None, q, k, k, None, dropout=0.0, cu_seq_lens_q=bounds, max_length_q=7)
    assert len(fake_flash4) == 1 and len(reference_kernel) == 1


def test_flash4_probe_plans_it_only_where_it_agrees_with_flash2(fake_flash4, reference_kernel, monkeypatch):
    import sys
    assert varlen_attention.flash4_runs.__wrapped__(4, 2, 16, torch.float32, "cpu")
    # Forward and gradients, a sequence longer than one kernel tile beside short ones, and a forward without gradients.
    assert [c["bounds_q"] for c in fake_flash4] == [[0, 300, 333, 340]] * 2 and len(reference_kernel) == 1
    interface = sys.modules["flash_attn.cute.interface"]
    right = interface.flash_attn_varlen_func

    def off_by_a_little(*args, **kwargs):
        out, lse = right(*args, **kwargs)
        return out * 1.05, lse
    monkeypatch.setattr(interface, "flash_attn_varlen_func", off_by_a_little)
    assert not varlen_attention.flash4_runs.__wrapped__(4, 2, 16, torch.float32, "cpu")

    def fails(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(interface, "flash_attn_varlen_func", fails)
    assert not varlen_attention.flash4_runs.__wrapped__(4, 2, 16, torch.float32, "cpu")


def test_a_failing_flash4_call_goes_on_with_flash2(fake_flash4, reference_kernel, monkeypatch):
    import sys

    def broken(*args, **kwargs):
        raise RuntimeError("lock on the kernel cache not acquired")
    monkeypatch.setattr(sys.modules["flash_attn.cute.interface"], "flash_attn_varlen_func", broken)
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    bounds = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="goes on with FlashAttention-2"):
        out, _ = varlen_attention.varlen_attention_forward(None, q, k, k, None, cu_seq_lens_q=bounds, max_length_q=7)
    want = per_document_attention(q.transpose(1, 2)[0], k.transpose(1, 2)[0], k.transpose(1, 2)[0], bounds, 7, 0.0,
                                  None)
    torch.testing.assert_close(out[0], want)
    assert len(reference_kernel) == 1 and varlen_attention._flash4 is False  # the rest of the run: FlashAttention-2


def test_flash4_compiled_kernels_are_kept_in_the_studio_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", raising=False)
    varlen_attention._cache_compiled_kernels.__wrapped__()
    import os
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path.resolve() / "cache" / "flash-attn-4")


def test_flash4_only_on_gpus_it_has_kernels_for(monkeypatch):
    import importlib.metadata
    installed = {"flash-attn-4": "4.0.0b36"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert varlen_attention.flash4_installed((9, 0)) and varlen_attention.flash4_installed((10, 0))
    assert not varlen_attention.flash4_installed((8, 0)) and not varlen_attention.flash4_installed(None)
    installed = {"flash-attn": "2.8.3"}  # FlashAttention-2's package: the same import name, not the same kernels
    assert not varlen_attention.flash4_installed((9, 0))


def test_plan_takes_flash4_where_it_runs_and_says_how_to_get_it(tiny_model):
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine
    cfg = tiny_config(tiny_model, data={"max_length": 4096}, training={"batch_size": 2})
    plan = plan_speed(cfg, machine("cuda", "llama", varlen_ok=True, flash4="ok"))
    assert plan.flash_attention_4 and "FlashAttention-4" in plan.summary()
    assert not plan_speed(cfg, machine("cuda", "llama", varlen_ok=True)).flash_attention_4
    missing = plan_speed(cfg, machine("cuda", "llama", varlen_ok=True, flash4="missing"))
    assert not missing.flash_attention_4 and "pip install flash-attn-4" in " ".join(missing.reasons)
    failed = plan_speed(cfg, machine("cuda", "llama", varlen_ok=True, flash4="failed"))
    assert not failed.flash_attention_4 and "did not run here" in " ".join(failed.reasons)
    # Only with the variable-length attention it stands in for.
    assert not plan_speed(cfg, machine("cuda", "gemma2", varlen_ok=True, flash4="ok")).flash_attention_4
    plain = tiny_config(tiny_model, data={"max_length": 4096}, training={"batch_size": 2, "speed": "plain"})
    assert not plan_speed(plain, machine("cuda", "llama", varlen_ok=True, flash4="ok")).flash_attention_4


def test_plan_keeps_flash2_where_layers_are_checkpointed(tiny_model):
    """With checkpointing FlashAttention-4 measured slower on the H200 (bench/NOTES.md, session 18)."""
    from studio.training.fast.plan import FLASH4_CHECKPOINTED, FLASH4_REASONS, plan_speed
    from tests.conftest import machine
    for training in ({"gradient_checkpointing": "on"}, {"gradient_checkpointing": "auto"}):
        cfg = tiny_config(tiny_model, data={"max_length": 4096}, training={"batch_size": 2, **training},
                          method={"method": "qlora"} if training["gradient_checkpointing"] == "auto" else {})
        plan = plan_speed(cfg, machine("cuda", "llama", varlen_ok=True, flash4="ok"))
        assert plan.gradient_checkpointing and not plan.flash_attention_4
        assert FLASH4_CHECKPOINTED in plan.reasons and FLASH4_REASONS["ok"] not in plan.reasons
        assert "FlashAttention-4" not in plan.summary()
    cfg = tiny_config(tiny_model, data={"max_length": 4096},
                      training={"batch_size": 2, "gradient_checkpointing": "off"})
    assert plan_speed(cfg, machine("cuda", "llama", varlen_ok=True, flash4="ok")).flash_attention_4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention-4 runs on Hopper and Blackwell GPUs")
@pytest.mark.parametrize("layout", ["heads-major", "tokens-major"])
def test_flash4_matches_per_document_attention_on_the_gpu(layout, monkeypatch):
    if not varlen_attention.flash4_installed(torch.cuda.get_device_capability()):
        pytest.skip("flash-attn-4 is not installed, or this GPU has no kernels of it")
    monkeypatch.setattr(varlen_attention, "_flash4", True)
    test_flash_kernel_matches_per_document_attention_on_the_gpu(layout)
    assert varlen_attention.flash4_runs(32, 8, 128, torch.bfloat16)


def test_padding_free_pairs_give_the_padded_batch_its_logits_and_gradients(reference_kernel):
    """DPO's batches (right-padded, positions from 0) run on their real tokens only: the same logits at every real
    position and the same gradients as the padded batch through SDPA with its mask."""
    from peft import LoraConfig, get_peft_model

    from studio.training.fast.padding_free import run_on_real_tokens
    # On a GPU machine an earlier run in this process may have put Liger's (GPU-only) kernels into transformers'
    # Llama classes: the models go where those run.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [11, 4, 8]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(row))
        mask[row, :n] = 1
    models = []
    for attention in ("sdpa", varlen_attention.NAME):
        model = get_peft_model(_tiny_llama(attention), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False)).to(device)
        if attention != "sdpa":
            run_on_real_tokens(model)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
        (logits[mask.bool()] ** 2).mean().backward()
        models.append((model, logits))
    (padded, padded_logits), (unpadded, unpadded_logits) = models
    real = mask.bool()
    torch.testing.assert_close(unpadded_logits[real], padded_logits[real], rtol=1e-4, atol=1e-5)
    assert reference_kernel == [((23, 4, 8), [0, 11, 15, 23], 11)] * 2  # only the 23 real tokens were computed
    for (name, p), q in zip(unpadded.named_parameters(), padded.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dpo_runs_padding_free_only_where_the_kernel_runs(tiny_model):
    from studio.training.fast import apply
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine
    for stage, on_gpu in (("dpo", True), ("kto", False), ("sft", False), ("grpo", False)):
        cfg = tiny_config(tiny_model, stage=stage, training={"packing": "off"})
        gpu = plan_speed(cfg, machine("cuda", "llama", varlen_ok=True))
        assert apply.padding_free(gpu, stage) is on_gpu, stage
        assert not apply.padding_free(plan_speed(cfg, machine("cuda", "llama", varlen_ok=False)), stage)
        assert not apply.padding_free(plan_speed(cfg, machine("cpu", "llama", varlen_ok=False)), stage)
    prompt = tiny_config(tiny_model, stage="dpo", method={"method": "prompt_tuning"})
    assert not apply.padding_free(plan_speed(prompt, machine("cuda", "llama", varlen_ok=True)), "dpo")


def test_liger_stays_on_the_triton_kernels_the_plan_was_measured_with(monkeypatch):
    """FlashAttention-4 brings CuTe's DSL, which newer Liger would otherwise prefer over its Triton kernels."""
    import sys
    import types

    from studio.training.fast import apply
    pinned = []
    dispatch = types.ModuleType("liger_kernel.backends.dispatch")
    dispatch.set_impl = pinned.append
    backends = types.ModuleType("liger_kernel.backends")
    backends.dispatch = dispatch
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.backends", backends)
    monkeypatch.setitem(sys.modules, "liger_kernel.backends.dispatch", dispatch)
    apply._liger_triton_kernels()
    assert pinned == ["triton"]
    monkeypatch.setitem(sys.modules, "liger_kernel.backends", None)  # an older Liger, without the dispatcher
    monkeypatch.setitem(sys.modules, "liger_kernel.backends.dispatch", None)
    apply._liger_triton_kernels()
    assert pinned == ["triton"]
