"""The memory techniques for long sequences and small cards (activations.py) compute what the plain path computes,
and the planner picks each exactly where its estimate says the run needs it."""

from __future__ import annotations

import pytest

from tests.conftest import llama_8b_shape

torch = pytest.importorskip("torch")


def _tiny_lora(dropout: float, seed: int = 0, adapt_base=None, tied: bool = False):
    """A tiny Llama with LoRA on every projection; `adapt_base(model)` runs before PEFT wraps it, as the studio's
    adapt_base_model does."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    if adapt_base is not None:
        adapt_base(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))
    torch.manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.train()
    return model


def _loss_and_grads(model, ids):
    torch.manual_seed(2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _assert_same(got, want):
    loss, grads = got
    ref_loss, ref_grads = want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert grads[name].abs().sum() > 0 or ref_grads[name].abs().sum() == 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _same_as_plain_counting_offloaded_backwards(offloaded, plain, ids) -> int:
    """Check `offloaded` gives `plain`'s loss and gradients; how many offloaded-checkpoint backwards that ran."""
    from studio.training.fast import activations
    calls = []
    original = activations._OffloadedCheckpoint.backward
    activations._OffloadedCheckpoint.backward = staticmethod(lambda ctx, *g: calls.append(1) or original(ctx, *g))
    try:
        _assert_same(_loss_and_grads(offloaded, ids), _loss_and_grads(plain, ids))
    finally:
        activations._OffloadedCheckpoint.backward = original
    return len(calls)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("uncheckpointed", [0, 1])
def test_offloaded_checkpoints_give_the_plain_loss_and_gradients(dropout, fused, uncheckpointed):
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    from studio.training.fast.fused_lora import fuse_lora_layers
    ids = torch.randint(0, 97, (2, 19))
    plain, offloaded = _tiny_lora(dropout), _tiny_lora(dropout)
    if fused:
        fuse_lora_layers(plain)
        fuse_lora_layers(offloaded)
    checkpointed = checkpoint_layers(offloaded.get_base_model(), uncheckpointed)
    assert activations.offload_checkpoints(_layers(offloaded)) == checkpointed == 3 - uncheckpointed
    calls = _same_as_plain_counting_offloaded_backwards(offloaded, plain, ids)
    assert calls == checkpointed  # every checkpointed layer went through the offloaded path


def test_offloaded_checkpoints_leave_frozen_layers_below_out_of_the_backward():
    """With method.last_layers the layers below the adapted ones train nothing and get no gradient: the offloaded
    checkpoint runs them once without a graph instead of recomputing them in the backward, with the same loss and
    gradients."""
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    ids = torch.randint(0, 97, (2, 13))

    def first_layer_frozen(model):
        for name, param in model.named_parameters():
            if ".layers.0." in name:
                param.requires_grad_(False)
        return model
    plain, offloaded = first_layer_frozen(_tiny_lora(0.0)), first_layer_frozen(_tiny_lora(0.0))
    checkpointed = checkpoint_layers(offloaded.get_base_model())
    assert activations.offload_checkpoints(_layers(offloaded)) == checkpointed == 3
    # the two adapted layers; the frozen first one is not recomputed
    assert _same_as_plain_counting_offloaded_backwards(offloaded, plain, ids) == 2


def test_offloaded_checkpoints_pass_the_input_gradient_on():
    """A layer input that needs its gradient (an earlier trainable layer's output) gets it through the offloaded
    checkpoint as through the plain layer."""
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    ids = torch.randint(0, 97, (2, 11))
    grads = []
    for offload in (False, True):
        model = _tiny_lora(0.0)
        base = model.get_base_model()
        if offload:
            checkpoint_layers(base)
            activations.offload_checkpoints(_layers(model))
        embeds = base.model.embed_tokens(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_gives_the_plain_loss_and_gradients(dropout, offload):
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    ids = torch.randint(0, 97, (2, 23))
    plain, tiled = _tiny_lora(dropout), _tiny_lora(dropout)
    if dropout:
        # Dropout draws its masks tile by tile, so the reference is the same tiles under plain autograd: what the
        # tiled backward must reproduce is the forward it ran, masks included.
        for module in plain.modules():
            if hasattr(module, "self_attn"):
                module.mlp.forward = lambda x, inner=module.mlp.forward: torch.cat(
                    [inner(t) for t in x.split(5, dim=-2)], dim=-2)
    if offload:
        checkpoint_layers(tiled.get_base_model(), 1)
        activations.offload_checkpoints(_layers(tiled))
    assert activations.tile_mlps(tiled, 5) == 3
    assert activations.tile_mlps(tiled, 5) == 0  # once only
    calls = []
    original = activations._TiledMLP.backward
    activations._TiledMLP.backward = staticmethod(lambda ctx, g: calls.append(1) or original(ctx, g))
    try:
        _assert_same(_loss_and_grads(tiled, ids), _loss_and_grads(plain, ids))
    finally:
        activations._TiledMLP.backward = original
    assert len(calls) == 3


def test_a_plan_with_last_layers_keeps_frozen_layers_out_of_the_backward():
    """LoRA in the last layer only, the plan's offloaded checkpoint and MLP tiles applied as a run applies them: the
    frozen layers beneath get no gradient (nothing of theirs is kept or recomputed), and the loss and gradients are
    the plain path's."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.training.fast import activations
    from studio.training.fast.apply import adapt_base_model, adapt_peft_model
    from studio.training.fast.plan import SpeedPlan
    plan = SpeedPlan(packing=False, attention="sdpa", liger=False, gradient_checkpointing=True, uncheckpointed_layers=0,
                     offloaded_layers=1, adapted_layers=1, layers=3, mlp_tile_tokens=4)

    def last_layer_lora(adapt_base=None):
        config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        if adapt_base is not None:
            adapt_base(base)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                layers_to_transform=[2]))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        return model.train()
    plain, planned = last_layer_lora(), last_layer_lora(lambda base: adapt_base_model(base, plan))
    adapt_peft_model(planned, plan)
    assert activations.tile_mlps(planned, plan.mlp_tile_tokens) == 3
    outputs = []
    hooks = [layer.register_forward_hook(lambda module, args, out: outputs.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad)) for layer in _layers(planned)]
    ids = torch.randint(0, 97, (2, 13))
    assert _same_as_plain_counting_offloaded_backwards(planned, plain, ids) == 1  # the adapted layer only
    for hook in hooks:
        hook.remove()
    assert outputs[:3] == [False, False, True]


def _plan(length: int, limit: float, method: str = "qlora", host: float | None = 500.0, processes: int = 1,
          tied: bool = False, stage: str = "sft", last_layers: int = 0):
    from studio.config import from_dict
    from studio.training.fast.plan import Machine, plan_speed
    shape = llama_8b_shape(tied)
    cfg = from_dict({"name": "x", "model": {"name_or_path": "x"}, "data": {"max_length": length}, "stage": stage,
                     "method": {"method": method, "rank": 16, "last_layers": last_layers},
                     "training": {"batch_size": 1, "memory_limit_gib": limit, "precision": "bf16"}})
    machine = Machine(device="cuda", model_type="llama", shape=shape, free_gib=139.0, host_free_gib=host,
                      liger_installed=True, varlen_ok=True, processes=processes)
    return plan_speed(cfg, machine), shape, cfg


def _peak(plan, shape, cfg, checkpointed=None, offloaded=None, mlp_tile=None, host_embeddings=None):
    from studio.training.fast.memory import peak_gib
    from studio.training.fast.plan import tokens_per_step
    adapted = plan.adapted_layers or plan.layers
    checkpointed = (adapted - plan.uncheckpointed_layers if plan.gradient_checkpointing else 0) \
        if checkpointed is None else checkpointed
    return peak_gib(shape, cfg.method.method, cfg.method.rank, tokens_per_step(cfg), checkpointed, plan.liger,
                    offloaded=plan.offloaded_layers if offloaded is None else offloaded,
                    mlp_tile=plan.mlp_tile_tokens if mlp_tile is None else mlp_tile,
                    host_embeddings=plan.host_embeddings if host_embeddings is None else host_embeddings,
                    adapted=plan.adapted_layers)


def test_planner_leaves_the_techniques_off_where_checkpointing_is_enough():
    from studio.training.fast.memory import FILL
    for length, limit in ((4096, 0.0), (4096, 12.0), (65536, 0.0)):
        plan, shape, cfg = _plan(length, limit)
        assert plan.offloaded_layers == 0 and plan.mlp_tile_tokens == 0, (length, limit, plan.reasons)
        assert not any("offloaded" in r or "MLP in tiles" in r for r in plan.reasons)
        assert plan.memory_estimate_gib <= FILL * plan.memory_budget_gib


def test_planner_offloads_where_every_layer_checkpointed_does_not_fit():
    from studio.training.fast.memory import FILL
    for length, limit in ((65536, 20.0), (4096, 8.5)):
        plan, shape, cfg = _plan(length, limit)
        assert plan.gradient_checkpointing and plan.offloaded_layers > 0, plan.reasons
        assert plan.mlp_tile_tokens == 0 and not plan.host_embeddings
        assert _peak(plan, shape, cfg, checkpointed=32, offloaded=0) > FILL * limit  # it had to
        assert _peak(plan, shape, cfg) < _peak(plan, shape, cfg, checkpointed=32, offloaded=0)
        assert plan.memory_estimate_gib <= limit
        assert any(r.startswith("offloaded checkpoints: on") for r in plan.reasons)
        assert "host memory" in plan.summary()


def test_planner_tiles_the_mlp_where_offloading_is_not_enough_and_respects_the_host():
    from studio.training.fast.memory import FILL
    plan, shape, cfg = _plan(400_000, 80.0)
    assert plan.offloaded_layers > 0 and plan.mlp_tile_tokens > 0, plan.reasons
    assert _peak(plan, shape, cfg, checkpointed=32, offloaded=32, mlp_tile=0) > FILL * 80  # tiling was needed
    assert plan.memory_estimate_gib <= FILL * 80
    # A host with room for only some layers' inputs: fewer offloaded, and the plan says why.
    small, _, _ = _plan(400_000, 80.0, host=60.0)
    assert 0 < small.offloaded_layers < plan.offloaded_layers
    assert small.offloaded_layers * 400_000 * 4096 * 2 <= 0.8 * 60.0 * 2**30
    none, _, _ = _plan(400_000, 80.0, host=4.0)
    assert none.offloaded_layers == 0 and any("no room" in r for r in none.reasons)
    # Several processes never offload (their hooks expect one backward graph).
    ddp, _, _ = _plan(65536, 20.0, processes=2)
    assert ddp.offloaded_layers == 0 and ddp.mlp_tile_tokens == 0 and any("one process only" in r for r in ddp.reasons)
    fsdp, _, _ = _plan(400_000, 80.0, processes=4)
    assert fsdp.strategy == "fsdp" and fsdp.offloaded_layers == 0 and fsdp.mlp_tile_tokens == 0


def test_estimate_counts_the_techniques():
    from studio.training.fast.memory import peak_gib
    shape = llama_8b_shape()
    plain = peak_gib(shape, "qlora", 16, 65536, 32, True)
    offloaded = peak_gib(shape, "qlora", 16, 65536, 32, True, offloaded=32)
    tiled = peak_gib(shape, "qlora", 16, 65536, 32, True, offloaded=32, mlp_tile=8192)
    # 30 of the 32 layer inputs (512 MiB each) leave the GPU; the MLP's three intermediate widths per token go.
    assert plain - offloaded == pytest.approx(30 * 65536 * 4096 * 2 / 2**30)
    assert offloaded > tiled
    assert peak_gib(shape, "qlora", 16, 4096, 32, True, mlp_tile=8192) == peak_gib(shape, "qlora", 16, 4096, 32, True)


def test_estimate_counts_only_the_layers_with_adapters():
    """With method.last_layers the frozen layers beneath keep nothing for the backward, and only the adapted layers'
    LoRA weights train."""
    from studio.training.fast.memory import GIB, fixed_bytes, layer_activation_bytes, peak_gib
    shape = llama_8b_shape()
    every, last8 = (peak_gib(shape, "qlora", 16, 4096, 0, True, adapted=a) for a in (0, 8))
    fewer_activations = 24 * 4096 * layer_activation_bytes(shape, True)
    fewer_trained = fixed_bytes(shape, "qlora", 16, 4096) - fixed_bytes(shape, "qlora", 16, 4096, adapted=8)
    assert fewer_trained == pytest.approx(0.75 * 16 * shape.lora_parameters(16))
    assert every - last8 == pytest.approx((fewer_activations + fewer_trained) / GIB)
    # Checkpointed and offloaded layers count among the adapted ones; past them, the same as all of them.
    assert peak_gib(shape, "qlora", 16, 4096, 32, True, adapted=8) == peak_gib(shape, "qlora", 16, 4096, 8, True,
                                                                              adapted=8)
    assert peak_gib(shape, "qlora", 16, 4096, 4, True, adapted=32) == peak_gib(shape, "qlora", 16, 4096, 4, True)


def test_planner_checkpoints_only_what_the_adapted_layers_need():
    """An 8B QLoRA under 12 GiB checkpoints 26 of its 32 layers with adapters everywhere; with adapters on the last 8
    only it fits without checkpointing, and under 8.5 GiB without offloading, where every layer adapted needs both."""
    from studio.training.fast.memory import FILL
    every, _, _ = _plan(4096, 12.0)
    assert every.gradient_checkpointing and every.adapted_layers == 0
    last8, shape, cfg = _plan(4096, 12.0, last_layers=8)
    assert not last8.gradient_checkpointing and last8.adapted_layers == 8, last8.reasons
    assert last8.memory_estimate_gib < every.memory_estimate_gib
    assert last8.memory_estimate_gib == pytest.approx(_peak(last8, shape, cfg), abs=0.05)
    small, _, _ = _plan(4096, 8.5)
    assert small.offloaded_layers > 0
    small8, shape, cfg = _plan(4096, 8.5, last_layers=8)
    assert small8.offloaded_layers == 0 and small8.memory_estimate_gib <= FILL * 8.5, small8.reasons
    # Tight enough that some adapted layers are checkpointed: counted among the 8, and the plan says so.
    tight, shape, cfg = _plan(16384, 10.0, last_layers=8)
    assert tight.gradient_checkpointing and 0 < tight.uncheckpointed_layers < 8, tight.reasons
    assert 0 < tight.offloaded_layers <= 8 - tight.uncheckpointed_layers
    assert any(r.startswith(f"checkpointing: {8 - tight.uncheckpointed_layers} of the 8 layers with adapters")
               for r in tight.reasons), tight.reasons
    checkpointed = 8 - tight.uncheckpointed_layers
    assert f"gradient checkpointing on {checkpointed} of the 8 layers with adapters" in tight.summary()
    assert tight.memory_estimate_gib <= FILL * 10.0 + 0.05
    # last_layers naming every layer or more: as if unset.
    assert _plan(4096, 12.0, last_layers=32)[0].adapted_layers == 0


def test_offloaded_checkpoints_go_to_the_adapted_layers():
    """The plan counts offloaded layers among the adapted ones (method.last_layers): the frozen layers beneath, which
    keep nothing for the backward, are not among them."""
    from studio.training.fast.activations import offloaded_checkpoint
    from studio.training.fast.apply import adapt_base_model
    from studio.training.fast.plan import SpeedPlan
    plan = SpeedPlan(packing=False, attention="sdpa", liger=False, gradient_checkpointing=True, uncheckpointed_layers=1,
                     offloaded_layers=1, adapted_layers=2, layers=3)
    model = _tiny_lora(0.0, adapt_base=lambda base: adapt_base_model(base, plan))

    def routed(layer):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        return getattr(func, "func", None) is offloaded_checkpoint
    assert [routed(layer) for layer in _layers(model)] == [False, True, False]


def test_rows_of_one_long_sequence_go_to_cudnn_attention(monkeypatch):
    """Only a row that is one sequence (boundaries [0, n]) of at least the planned length takes cuDNN's attention;
    packed rows of several sequences keep the variable-length kernel, and with the switch at 0 nothing changes."""
    from studio.training.fast import varlen_attention
    calls = []
    monkeypatch.setattr(varlen_attention, "_cudnn_causal",
                        lambda q, k, v, dropout, scale: calls.append("cudnn") or q.transpose(1, 2))
    monkeypatch.setattr(varlen_attention, "flash_varlen",
                        lambda q, k, v, bounds, n, dropout, scale: calls.append("varlen") or q)
    q = torch.zeros((1, 4, 64, 8))
    kv = torch.zeros((1, 2, 64, 8))
    one, two = torch.tensor([0, 64]), torch.tensor([0, 30, 64])
    monkeypatch.setattr(varlen_attention, "_cudnn_from", 32)
    for bounds in (one, two):
        out, _ = varlen_attention.varlen_attention_forward(None, q, kv, kv, None, cu_seq_lens_q=bounds, max_length_q=64)
        assert out.shape == (1, 64, 4, 8)
    monkeypatch.setattr(varlen_attention, "_cudnn_from", 128)  # shorter than the threshold
    varlen_attention.varlen_attention_forward(None, q, kv, kv, None, cu_seq_lens_q=one, max_length_q=64)
    monkeypatch.setattr(varlen_attention, "_cudnn_from", 0)  # off
    varlen_attention.varlen_attention_forward(None, q, kv, kv, None, cu_seq_lens_q=one, max_length_q=64)
    assert calls == ["cudnn", "varlen", "varlen", "varlen"]


def test_planner_sends_long_single_rows_to_cudnn_only_where_it_runs():
    from dataclasses import replace

    from studio.training.fast.plan import LONG_ROW_TOKENS, plan_speed
    plan, _, cfg = _plan(65536, 20.0)
    assert plan.long_rows_cudnn == 0  # the probe did not find cuDNN's attention working
    from studio.training.fast.plan import Machine
    shape = llama_8b_shape()
    machine = Machine(device="cuda", model_type="llama", shape=shape, free_gib=139.0, varlen_ok=True,
                      cudnn_attention_ok=True)
    assert plan_speed(cfg, machine).long_rows_cudnn == LONG_ROW_TOKENS
    assert any("cuDNN" in r for r in plan_speed(cfg, machine).reasons)
    assert plan_speed(cfg, replace(machine, varlen_ok=False)).long_rows_cudnn == 0  # flex attention: not there
    plain = replace(cfg, training=replace(cfg.training, speed="plain"))
    assert plan_speed(plain, machine).long_rows_cudnn == 0


def test_model_tab_estimate_shows_the_least_with_the_techniques(tiny_model):
    """The Model tab's memory table (Studio.describe_model) gives, beside the default estimate, the least the planner
    can bring the run to: every layer checkpointed (and, on a GPU, their inputs offloaded)."""
    from studio.service import Studio
    rows = Studio().describe_model(str(tiny_model))["memory"]
    assert rows and all("least GiB (with a memory limit)" in row for row in rows)
    lora = next(row for row in rows if row["method"].startswith("LoRA"))
    assert 0 < lora["least GiB (with a memory limit)"] <= lora["estimated GiB"]


def _plan_with_data(max_length: int, batch: int, limit: float, packing: str, rows: list[int] | None):
    from studio.config import from_dict
    from studio.training.fast.plan import Machine, data_lengths, plan_speed
    shape = llama_8b_shape()
    cfg = from_dict({"name": "x", "model": {"name_or_path": "x"}, "data": {"max_length": max_length},
                     "method": {"method": "qlora", "rank": 16},
                     "training": {"batch_size": batch, "memory_limit_gib": limit, "precision": "bf16",
                                  "packing": packing}})
    machine = Machine(device="cuda", model_type="llama", shape=shape, free_gib=139.0, host_free_gib=500.0,
                      liger_installed=True, varlen_ok=True)
    data = None if rows is None else data_lengths([{"input_ids": [5] * n, "labels": [5] * n} for n in rows])
    return plan_speed(cfg, machine, data)


def test_data_lengths_reads_the_rows():
    from studio.training.fast.plan import data_lengths
    lengths = data_lengths([{"input_ids": [1] * n} for n in (3, 9, 4)])
    assert (lengths.longest, lengths.total, lengths.rows) == (9, 16, 3)
    assert data_lengths([]) is None
    assert data_lengths([{"prompt": "no ids"}]) is None  # pairs and prompts carry no input_ids: not read


def test_planner_reads_the_longest_row_of_unpacked_data():
    # Rows padded to the longest in their batch: short data needs far less than batch_size x max_length.
    short = _plan_with_data(65536, 1, 20.0, "off", [900, 1200, 2000])
    assumed = _plan_with_data(65536, 1, 20.0, "off", None)
    assert short.micro_batch_tokens == 2000 and assumed.micro_batch_tokens == 65536
    assert short.offloaded_layers == 0 and assumed.offloaded_layers > 0, (short.reasons, assumed.reasons)
    assert short.memory_estimate_gib < assumed.memory_estimate_gib
    assert any("longest row is 2,000 tokens" in r for r in short.reasons), short.reasons
    assert any("not known here" in r for r in assumed.reasons), assumed.reasons
    # Rows longer than max_length are cut to it: the estimate never goes past batch_size x max_length.
    assert _plan_with_data(4096, 2, 0.0, "off", [9000]).micro_batch_tokens == 2 * 4096


def test_planner_reads_packed_rows_from_the_data():
    # Packed rows fill up to max_length whatever each document's length, so only data smaller than a micro-batch of
    # rows changes the estimate.
    many = _plan_with_data(4096, 2, 0.0, "on", [384] * 3000)
    assert many.micro_batch_tokens == 2 * 4096
    assert any("packed rows of up to 4,096 tokens" in r for r in many.reasons), many.reasons
    few = _plan_with_data(65536, 1, 20.0, "on", [3000, 2000])
    assert few.micro_batch_tokens == 5000 and few.offloaded_layers == 0, few.reasons
    assert any("5,000 tokens, less than 1 packed row of" in r for r in few.reasons), few.reasons
    # One sequence as long as the row: the same plan as from batch_size x max_length.
    whole = _plan_with_data(65536, 1, 20.0, "on", [65536])
    assumed = _plan_with_data(65536, 1, 20.0, "on", None)
    assert whole.micro_batch_tokens == assumed.micro_batch_tokens == 65536
    assert (whole.offloaded_layers, whole.uncheckpointed_layers) == (assumed.offloaded_layers,
                                                                      assumed.uncheckpointed_layers)


def test_host_buffers_pinned_ahead_are_the_ones_the_steps_use():
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    model = _tiny_lora(0.0)
    checkpoint_layers(model.get_base_model())
    assert activations.offload_checkpoints(_layers(model), 2) == 2
    activations.release_host_buffers()
    try:
        size = activations.pin_host_buffers(model, 19, torch.bfloat16)
        assert size == 2 * 19 * 32 * 2  # two offloaded layers' (tokens x hidden) bf16 inputs, the third not
        kept = dict(activations._host_buffers)
        # A shorter input reuses its slot's buffer (no pinning again); a longer one replaces it.
        like = torch.empty((1, 7, 32), dtype=torch.bfloat16)
        assert activations._pinned(0, like).data_ptr() == kept[0].data_ptr()
        assert activations._pinned(0, torch.empty((1, 40, 32), dtype=torch.bfloat16)).numel() == 40 * 32
    finally:
        activations.release_host_buffers()


def _count_calls(cls, name: str, calls: list):
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    return original, counted


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_host_embeddings_give_the_plain_loss_and_gradients(dropout):
    """The table in host memory, alone and with every other technique (all layers checkpointed and offloaded, the MLP
    in tiles): the plain path's loss and LoRA gradients; the table is no longer the model's to move."""
    from studio.training.fast import activations
    from studio.training.fast.apply import checkpoint_layers
    from studio.training.fast.host_embeddings import HostEmbedding, embeddings_to_host
    ids = torch.randint(0, 97, (2, 17))
    plain = _tiny_lora(dropout)
    alone = _tiny_lora(dropout, adapt_base=lambda base: embeddings_to_host(base))

    def everything(base):
        checkpoint_layers(base)
        activations.offload_checkpoints(_layers(base))
        assert embeddings_to_host(base)
    together = _tiny_lora(dropout, adapt_base=everything)
    activations.tile_mlps(together, 4)
    if dropout:  # the tiles draw dropout masks tile by tile: the reference runs the same tiles under plain autograd
        for model in (plain, alone):
            for module in model.modules():
                if hasattr(module, "self_attn"):
                    module.mlp.forward = lambda x, inner=module.mlp.forward: torch.cat(
                        [inner(t) for t in x.split(4, dim=-2)], dim=-2)
    calls = []
    original, counted = _count_calls(HostEmbedding, "forward", calls)
    HostEmbedding.forward = counted
    try:
        want = _loss_and_grads(plain, ids)
        for model in (alone, together):
            table = model.get_base_model().get_input_embeddings()
            assert isinstance(table, HostEmbedding)
            assert all(p is not table.weight for p in model.parameters())  # model.to(device) leaves it on the host
            assert not table.weight.requires_grad
            _assert_same(_loss_and_grads(model, ids), want)
    finally:
        HostEmbedding.forward = original
    assert len(calls) == 2  # both models looked their rows up through the host table


def test_host_embeddings_leave_a_tied_table_on_the_gpu():
    from studio.training.fast.host_embeddings import HostEmbedding, embeddings_to_host
    kept = []
    model = _tiny_lora(0.0, adapt_base=lambda base: kept.append(embeddings_to_host(base)), tied=True)
    assert kept == [False]
    assert not isinstance(model.get_base_model().get_input_embeddings(), HostEmbedding)


def test_planner_moves_the_embeddings_then_tiles_the_mlp_as_large_as_fits_under_8_gib():
    """From 4,096 tokens under 8 GiB every layer checkpointed and offloaded is not enough: the embedding table goes to
    the host first, then the MLP runs in the largest tiles whose estimate fits, each only where it must."""
    from studio.training.fast.memory import FILL
    from studio.training.fast.plan import MLP_TILE_TOKENS
    target = FILL * 8.0
    for length in (4096, 6144, 8192, 12288, 16384):
        plan, shape, cfg = _plan(length, 8.0)
        assert plan.offloaded_layers > 0 and plan.host_embeddings, (length, plan.reasons)
        assert _peak(plan, shape, cfg, host_embeddings=False, mlp_tile=0) > target  # it had to
        assert plan.memory_estimate_gib <= target + 0.05, (length, plan.reasons)
        assert any(r.startswith("input embeddings in host memory") for r in plan.reasons)
        assert "input embeddings in host memory" in plan.summary()
        if plan.mlp_tile_tokens:
            assert _peak(plan, shape, cfg, mlp_tile=0) > target  # tiles were needed
            larger = [t for t in MLP_TILE_TOKENS if t > plan.mlp_tile_tokens and length > t]
            # the largest tile that fits: every larger one (and a whole MLP) is over
            assert all(_peak(plan, shape, cfg, mlp_tile=t) > target for t in larger), (length, plan.reasons)
            assert any(r.startswith(f"MLP in tiles of {plan.mlp_tile_tokens:,}") for r in plan.reasons)
    tiles = {length: _plan(length, 8.0)[0].mlp_tile_tokens for length in (6144, 8192, 12288, 16384)}
    assert tiles[6144] == 0 and 0 < tiles[16384] < tiles[12288] < 8192, tiles  # longer: smaller tiles
    # A tied table is the LM head's weight, full fine-tuning trains it, and GRPO's decoding steps are CUDA graphs that
    # cannot hold the lookup's copies: the table stays on the GPU there, tiles instead.
    for tied, method, stage in ((True, "qlora", "sft"), (False, "full", "sft"), (False, "qlora", "grpo")):
        plan, _, _ = _plan(12288, 8.0 if method == "qlora" else 40.0, method=method, tied=tied, stage=stage)
        assert not plan.host_embeddings and plan.mlp_tile_tokens, (stage, plan.reasons)


def test_planner_gives_the_smallest_footprint_where_nothing_fits():
    from studio.training.fast.memory import FILL
    from studio.training.fast.plan import MLP_TILE_TOKENS
    plan, shape, cfg = _plan(65536, 8.0)
    assert plan.host_embeddings and plan.mlp_tile_tokens == MLP_TILE_TOKENS[-1], plan.reasons
    assert plan.memory_estimate_gib > FILL * 8.0 and any("may not fit" in r for r in plan.reasons)
