"""The fused LoRA path must compute what PEFT computes: same outputs, same gradients, same fallbacks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _twins(build_base, **lora_kwargs):
    """Two identical PEFT models (r=4, alpha 8, every linear layer) over `build_base()`, called under the same
    seed each time; B is made non-zero so the LoRA term matters."""
    from peft import LoraConfig, get_peft_model
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(build_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora_kwargs))
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        models.append(model)
    return models


def _peft_pair(dropout: float = 0.0, **lora_kwargs):
    """Two identical PEFT models on a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return _twins(lambda: LlamaForCausalLM(config), lora_dropout=dropout, **lora_kwargs)


def _loss_and_grads(model, ids, seed=2):
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_matches_peft_outputs_and_gradients(dropout):
    from studio.training.fast.fused_lora import fuse_lora_layers
    reference, fused = _peft_pair(dropout)
    assert fuse_lora_layers(fused) == 2 * 7  # every projection of both layers
    ids = torch.randint(0, 97, (3, 17))
    ref_loss, ref_logits, ref_grads = _loss_and_grads(reference, ids)
    loss, logits, grads = _loss_and_grads(fused, ids)
    # The same random draws reach the same dropout, so even with dropout on the numbers must agree.
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 7
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_input_gradient_and_eval_mode():
    """The gradient reaching the layer input (what earlier layers learn from) and eval-mode outputs match."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    reference, fused = _peft_pair(dropout=0.2)
    fuse_lora_layers(fused)
    layer_ref = reference.base_model.model.model.layers[0].self_attn.q_proj
    layer_fused = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert not hasattr(layer_fused, "_studio_siblings")  # one dropout mask per projection: no shared node
    x = torch.randn(2, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    for model in (reference, fused):
        model.eval()  # dropout off: deterministic
    y_ref, y = layer_ref(x), layer_fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (y_ref * torch.arange(y_ref.shape[-1])).sum().backward()
    (y * torch.arange(y.shape[-1])).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)


def test_fused_lora_bf16_autocast_matches_peft_closely():
    """Under bf16 autocast (how GPU training runs) the fused result stays within bf16 rounding of PEFT's."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    reference, fused = _peft_pair()
    fuse_lora_layers(fused)
    ids = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(input_ids=ids).logits.float()
        out = fused(input_ids=ids).logits.float()
    assert out.dtype == ref.dtype
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_fused_lora_falls_back_where_it_does_not_apply():
    """DoRA is left to PEFT; merged or disabled adapters take PEFT's own path at call time."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    dora, _ = _peft_pair(use_dora=True)
    assert fuse_lora_layers(dora) == 0
    reference, fused = _peft_pair()
    fuse_lora_layers(fused)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        with fused.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        lora_on = fused(input_ids=ids).logits
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, lora_on, rtol=1e-4, atol=1e-4)


def test_sibling_projections_share_one_node_and_match_peft_under_checkpointing():
    """q/k/v and gate/up run as one grouped node; with gradient checkpointing (recomputed forward, as QLoRA
    trains) the loss and every adapter gradient still match PEFT's."""
    from studio.training.fast import fused_lora
    reference, fused = _peft_pair()
    fused_lora.fuse_lora_layers(fused)
    attention = fused.base_model.model.model.layers[0].self_attn
    assert attention.q_proj._studio_siblings is attention.v_proj._studio_siblings
    calls = []
    original = fused_lora._LoraLinearGroup.apply
    fused_lora._LoraLinearGroup.apply = lambda *a: calls.append(1) or original(*a)
    try:
        for model in (reference, fused):
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.base_model.model.enable_input_require_grads()
        ids = torch.randint(0, 97, (2, 11))
        ref_loss, _, ref_grads = _loss_and_grads(reference, ids)
        loss, _, grads = _loss_and_grads(fused, ids)
    finally:
        fused_lora._LoraLinearGroup.apply = original
    assert len(calls) == 2 * 2 * 2  # 2 groups x 2 layers, forward and the recomputed forward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sibling_output_is_only_reused_for_the_same_input():
    from studio.training.fast.fused_lora import fuse_lora_layers
    reference, fused = _peft_pair()
    fuse_lora_layers(fused)
    ref_attn = reference.base_model.model.model.layers[0].self_attn
    attn = fused.base_model.model.model.layers[0].self_attn
    x1, x2 = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        attn.q_proj(x1)  # computes and holds k and v for x1
        torch.testing.assert_close(attn.k_proj(x2), ref_attn.k_proj(x2))  # a different input is computed afresh
        torch.testing.assert_close(attn.v_proj(x2), ref_attn.v_proj(x2))
        torch.testing.assert_close(attn.q_proj(x2), ref_attn.q_proj(x2))


def _qlora_pair():
    """Two identical PEFT models over a tiny Llama whose projections are bitsandbytes 4-bit NF4 layers
    (bitsandbytes quantises on the CPU too)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)

    def quantised_base():
        model = LlamaForCausalLM(config)
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                        q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to("cpu")
                        setattr(parent, name, q)
        for param in model.parameters():
            param.requires_grad_(False)
        return model
    return _twins(quantised_base)


@pytest.mark.parametrize("pack", [True, False])
def test_4bit_checkpointed_layers_reuse_the_recomputed_weight_and_match_peft(pack):
    """QLoRA under checkpointing: the weight dequantised in the recompute serves that layer's backward (two
    dequantisations per weight and step, not three), and loss and gradients still match PEFT's. Packed, the
    q/k/v and gate/up siblings are one dequantisation each: 4 weights a layer instead of 7."""
    from studio.training.fast import fused_lora
    from studio.training.fast.apply import checkpoint_layers as enable_checkpointing
    reference, fused = _qlora_pair()
    assert fused_lora.fuse_lora_layers(fused, pack_4bit=pack) == 2 * 7
    for model in (reference, fused):
        enable_checkpointing(model.base_model.model)
    dequantised = []
    original = fused_lora._dense_weight
    fused_lora._dense_weight = lambda w, qs, dt: (dequantised.append(qs is not None) or original(w, qs, dt))
    try:
        ids = torch.randint(0, 97, (2, 11))
        ref_loss, _, ref_grads = _loss_and_grads(reference, ids)
        loss, _, grads = _loss_and_grads(fused, ids)
    finally:
        fused_lora._dense_weight = original
    assert sum(dequantised) == 2 * (4 if pack else 7) * 2  # forward and recompute; the backward reuses the latter
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_4bit_siblings_share_storage_and_the_base_layers_still_work():
    """Packing moves the siblings' 4-bit bytes into one buffer without a second copy; bitsandbytes' own
    layers (adapters off) compute what they did before, and a member whose weight is replaced afterwards
    makes its group fall back to one dequantisation per member, still matching PEFT."""
    from studio.training.fast import fused_lora
    reference, fused = _qlora_pair()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad(), fused.disable_adapter():
        base_before = fused(input_ids=ids).logits
    fused_lora.fuse_lora_layers(fused)
    attention = fused.base_model.model.model.layers[0].self_attn
    group = attention.q_proj._studio_siblings
    assert group.packed is not None
    weights = [getattr(attention, n).get_base_layer().weight for n in ("q_proj", "k_proj", "v_proj")]
    assert all(w.data.untyped_storage().data_ptr() == group.packed.weight.untyped_storage().data_ptr()
               for w in weights)
    assert sum(w.data.numel() for w in weights) == group.packed.weight.numel()
    with torch.no_grad(), fused.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, base_before, rtol=0, atol=0)
    weights[1].data = weights[1].data.clone()  # e.g. moved or reloaded: no longer in the shared buffer
    assert not group.packed.current([w.data for w in weights])
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_kept_adapter_casts_follow_the_optimizer():
    """The cast/scaled adapter weights are kept between forwards; an optimizer step (in-place update) must
    be seen by the next forward, or training would silently use stale adapters."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    reference, fused = _peft_pair()
    fuse_lora_layers(fused)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        fused(input_ids=ids)  # fills the caches
        for model in (reference, fused):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.add_(0.05)  # what an optimizer does: an in-place update
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # The fused AdamW the Trainer picks updates parameters without moving their version counters.
        for model in (reference, fused):
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            torch.optim.AdamW(params, lr=0.1, fused=True).step()
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        for model in (reference, fused):  # a whole new tensor behind the parameter (a loaded checkpoint)
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.data = param.data.clone().mul_(1.5)
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_kept_casts_are_refreshed_together_after_an_optimizer_step(monkeypatch):
    """After an optimizer step every kept cast is recomputed at once (foreach kernels), not one by one at its
    first use; the numbers stay PEFT's, and a model that is let go leaves nothing behind."""
    import gc

    from studio.training.fast import fused_lora
    reference, fused = _peft_pair()
    fused_lora.fuse_lora_layers(fused)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        fused(input_ids=ids)  # fills the caches
    ours = [k for k, e in fused_lora._KeptCasts.entries.items()
            if any(e[0]() is p for n, p in fused.named_parameters() if "lora_" in n)]
    assert len(ours) == 2 * (2 + 2 + 7)  # per layer: the q/k/v and gate/up A stacks, the o and down A, 7 B
    made_alone = []
    monkeypatch.setattr(fused_lora._KeptCasts, "remember", lambda *a: made_alone.append(a))
    for model in (reference, fused):
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        torch.optim.AdamW(params, lr=0.1, fused=True).step()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert made_alone == []
    del fused, model, params, p
    gc.collect()
    assert not set(ours) & set(fused_lora._KeptCasts.entries)
