"""The LoRA MLP as one node (studio/training/fast/lora_mlp.py): the same numbers and gradients as a float64 reference
and as the per-projection fused LoRA path, its Triton kernels under triton's interpreter, its fallbacks, and the
planner's rule for when it is used."""

import pytest
import torch

from studio.training.fast import lora_mlp
from tests.conftest import llama_8b_shape, machine
from tests.interpreter import passes_under_the_interpreter


def _case(tokens=70, hidden=24, width=200, ranks=(8, 16, 4), dtype=torch.float64, seed=0):
    """x and the MLP's parameters: (w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down). 70 tokens and
    200 columns: several kernel blocks of tokens and two column tiles, the last ones short; the ranks differ and are
    below the dots' 16."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    rg, ru, rd = ranks
    x = rand(tokens, hidden)
    params = (rand(width, hidden, scale=0.3), rand(width, hidden, scale=0.3), rand(hidden, width, scale=0.1),
              rand(rg, hidden, scale=0.3), rand(width, rg, scale=0.3), rand(ru, hidden, scale=0.3),
              rand(width, ru, scale=0.3), rand(rd, width, scale=0.1), rand(hidden, rd, scale=0.3))
    return x, params


SCALINGS = (2.0, 0.5, 1.5)


def _reference(x, params, scalings=SCALINGS):
    wg, wu, wd, ag, bg, au, bu, ad, bd = params
    sg, su, sd = scalings
    gate = x @ wg.T + sg * (x @ ag.T) @ bg.T
    up = x @ wu.T + su * (x @ au.T) @ bu.T
    h = torch.nn.functional.silu(gate) * up
    return h @ wd.T + sd * (h @ ad.T) @ bd.T


def _check_against_reference(dtype=torch.float32, tolerance=1e-4, **case):
    """`_LoraSwiGLU` in `dtype` against float64 autograd on the same inputs: output, input and LoRA gradients."""
    x, params = _case(dtype=dtype, **case)
    frozen = params[:3]
    leaves = [x.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in params[3:]]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    out = lora_mlp._LoraSwiGLU.apply(leaves[0], dtype, SCALINGS, *frozen, *leaves[1:])
    ref = _reference(ref_leaves[0], (*(w.double() for w in frozen), *ref_leaves[1:]))
    weights = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view(out.shape)
    (out.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= tolerance * ref.abs().max()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype and want.grad.abs().max() > 0
        assert (got.grad.double() - want.grad).abs().max() <= tolerance * want.grad.abs().max()


def _check_any_layout_of_the_factors():
    """The kernels read row-major matrices: factors laid out otherwise (column-major B and A) give the same results."""
    g = torch.Generator().manual_seed(4)
    gate, up = torch.randn(40, 150, generator=g), torch.randn(40, 150, generator=g)
    xa, b_gate, b_up = torch.randn(40, 24, generator=g), torch.randn(150, 8, generator=g), torch.randn(150, 16, generator=g)
    grad_h, grad_xa_down, a_down = torch.randn(40, 150, generator=g), torch.randn(40, 4, generator=g), \
        torch.randn(4, 150, generator=g)

    def column_major(t):
        return t.t().contiguous().t()
    h = lora_mlp.swiglu_forward(gate, up, xa, b_gate, b_up)
    assert torch.equal(lora_mlp.swiglu_forward(gate, up, xa, column_major(b_gate), column_major(b_up)), h)
    g1, u1, g2, u2 = gate.clone(), up.clone(), gate.clone(), up.clone()
    lora_mlp.swiglu_backward(grad_h, g1, u1, xa, b_gate, b_up, grad_xa_down, a_down)
    lora_mlp.swiglu_backward(column_major(grad_h), g2, u2, xa, column_major(b_gate), b_up, grad_xa_down,
                             column_major(a_down))
    assert torch.equal(g1, g2) and torch.equal(u1, u2)


def _check_fewer_stages_where_shared_memory_is_short():
    """A launch Triton refuses for its shared memory (high ranks, smaller GPUs) runs again one stage shallower, down to
    one; the depth that fitted is used from then on for that kernel and rank, and a refusal at one stage is raised."""
    from triton.runtime.errors import OutOfResources

    class Kernel:  # stands in for a compiled kernel whose buffers fit `fits` stages
        def __init__(self, fits):
            self.fits, self.tried = fits, []

        def __getitem__(self, grid):
            def launch(*args, STAGES, **kwargs):
                self.tried.append(STAGES)
                if STAGES > self.fits:
                    raise OutOfResources(STAGES * 80_000, 232_448, "shared memory")
            return launch
    device = torch.device("cpu")
    kernel = Kernel(fits=1)
    for _ in range(2):
        lora_mlp._launch(kernel, 4, 20, 600, ranks=(64, 64, 64), device=device)
    assert kernel.tried == [3, 2, 1, 1]
    lora_mlp._launch(kernel, 4, 20, 600, ranks=(16, 16, 16), device=device)  # another rank: tries from STAGES again
    assert kernel.tried[4:] == [3, 2, 1]
    with pytest.raises(OutOfResources):
        lora_mlp._launch(Kernel(fits=0), 4, 20, 600, ranks=(128, 128, 128), device=device)


def test_the_pytorch_path_matches_a_float64_reference():
    assert not lora_mlp.triton_runs(torch.device("cpu"))  # the PyTorch arithmetic, in this process
    _check_against_reference(torch.float32, 1e-5)
    _check_against_reference(torch.bfloat16, 3e-2)


def test_the_triton_kernels_match_the_reference_under_the_interpreter():
    """The kernels that run on GPUs, run by triton's interpreter on this CPU, in a process of their own (the
    interpreter is chosen when triton is imported)."""
    passes_under_the_interpreter(
        "import torch\nfrom studio.training.fast import lora_mlp\nfrom tests.test_lora_mlp import "
        "_check_against_reference\nassert lora_mlp.triton_runs(torch.device('cpu'))\n"
        "_check_against_reference(torch.float32, 1e-5)\n"
        "_check_against_reference(torch.bfloat16, 3e-2)\n"
        "_check_against_reference(torch.float16, 3e-2, ranks=(32, 32, 32), tokens=64, width=128)\n"
        # five column tiles: the backward's programs walk two each, the last one's second tile past the width
        "_check_against_reference(torch.float32, 1e-5, tokens=20, width=600)\n"
        # ranks that are not powers of two, padded to a dot of 64 and 16
        "_check_against_reference(torch.float32, 1e-5, ranks=(24, 8, 48), tokens=20, width=150)\n"
        "from tests.test_lora_mlp import _check_fewer_stages_where_shared_memory_is_short\n"
        "_check_fewer_stages_where_shared_memory_is_short()\n"
        "import pytest\nfrom tests.test_lora_mlp import test_a_second_backward_is_refused_not_wrong\n"
        "test_a_second_backward_is_refused_not_wrong(None)\n"
        "from tests.test_lora_mlp import _check_any_layout_of_the_factors\n_check_any_layout_of_the_factors()")


def _peft_pair(dropout=0.0, dtype=torch.bfloat16):
    from tests.test_fused_lora import _twins
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return [m.to(dtype) for m in _twins(lambda: LlamaForCausalLM(config), lora_dropout=dropout)]


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_a_model_trains_the_same_through_the_one_node(monkeypatch, dtype, tolerance):
    """A tiny Llama with LoRA on every projection: the same loss and LoRA gradients as with each projection fused on
    its own. In float32 (let through for the test) to float32 sums; in bf16, as GPUs train, within its rounding
    (the one node rounds the gate and up values once, the other path three times)."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: True)  # the PyTorch arithmetic on this CPU
    monkeypatch.setattr(lora_mlp, "SIXTEEN_BIT", (dtype,))
    reference, fused = _peft_pair(dtype=dtype)
    fuse_lora_layers(reference), fuse_lora_layers(fused)
    assert lora_mlp.fuse_lora_mlps(fused) == 2 and lora_mlp.fuse_lora_mlps(fused) == 0  # once only
    calls = []
    original = lora_mlp._LoraSwiGLU.apply
    monkeypatch.setattr(lora_mlp._LoraSwiGLU, "apply", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(3))
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(fused, ids)
    assert len(calls) == 2  # both layers' MLPs took the one node
    assert abs(loss - ref_loss) <= tolerance * ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        if ".mlp." in name:
            assert want.abs().max() > 0, name
        assert (grads[name] - want).abs().max() <= tolerance * want.abs().max(), name


def test_calls_it_does_not_cover_run_the_mlps_own_forward(monkeypatch):
    """Adapters turned off (the forgetting check's base model) run the MLP's own forward and give the base's output;
    MLPs with LoRA dropout are not routed at all; without the kernels the MLP's own forward runs."""
    from studio.training.fast.fused_lora import fuse_lora_layers
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: True)
    model, dropped = _peft_pair()[0], _peft_pair(dropout=0.1)[0]
    fuse_lora_layers(model), fuse_lora_layers(dropped)
    assert lora_mlp.fuse_lora_mlps(dropped) == 0
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    lora_mlp.fuse_lora_mlps(model)
    calls = []
    original = lora_mlp._LoraSwiGLU.apply
    monkeypatch.setattr(lora_mlp._LoraSwiGLU, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad(), model.disable_adapter():
        again = model(input_ids=ids).logits
    assert not calls and torch.equal(again, base)
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: False)
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: True)
    monkeypatch.setattr(lora_mlp, "MAX_RANK", 2)  # a rank the kernels' dots could not hold: the MLP's own forward
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fallback_logits(model, ids))
    assert len(calls) == 2


def fallback_logits(model, ids):
    """The logits with every MLP on its own forward (the per-projection path)."""
    saved = {}
    for layer in model.base_model.model.model.layers:
        saved[layer.mlp] = layer.mlp.__dict__.pop("forward")
    try:
        return model(input_ids=ids).logits
    finally:
        for mlp, forward in saved.items():
            mlp.forward = forward


def test_only_plain_swiglu_mlps_are_routed(monkeypatch):
    """An MLP with the same projections whose forward does something else (scales, clamps, normalises) keeps it."""
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: True)
    from studio.training.fast.fused_lora import fuse_lora_layers
    model = _peft_pair()[0]
    fuse_lora_layers(model)
    for layer in model.base_model.model.model.layers:
        layer.mlp.__class__ = type("ScaledMLP", (layer.mlp.__class__,), {})
    assert lora_mlp.fuse_lora_mlps(model) == 0


def test_a_second_backward_is_refused_not_wrong(monkeypatch):
    """The backward writes the gradients over the gate and up values it kept: a second one must fail loudly."""
    x, params = _case(dtype=torch.float32)
    leaves = [x.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in params[3:]]
    out = lora_mlp._LoraSwiGLU.apply(leaves[0], torch.float32, SCALINGS, *params[:3], *leaves[1:])
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_the_trainers_callback_routes_the_mlps(monkeypatch):
    from studio.training.fast import apply
    from studio.training.fast.fused_lora import fuse_lora_layers
    from studio.training.fast.plan import SpeedPlan
    monkeypatch.setattr(lora_mlp, "path_runs", lambda device: True)
    model = _peft_pair()[0]
    fuse_lora_layers(model)
    plan = SpeedPlan(packing=True, attention="sdpa", liger=False, gradient_checkpointing=False, fused_lora=True,
                     fused_lora_mlp=True)
    for callback in apply.trainer_callbacks(plan):
        callback.on_train_begin(None, None, None, model=model)
    assert all(getattr(layer.mlp, "_studio_lora_mlp", False) for layer in model.base_model.model.model.layers)


def test_the_planner_uses_it_for_16_bit_lora_without_dropout_on_gpus_with_triton():
    plan = _plan()
    assert plan.fused_lora_mlp and "LoRA MLP" in plan.summary()
    with_dropout = _plan(dropout=0.05)  # the studio's default: each projection would need its own mask
    assert not with_dropout.fused_lora_mlp and "LoRA MLP" not in with_dropout.summary()
    assert any("LoRA MLP kernel: off (LoRA dropout 0.05" in r for r in with_dropout.reasons)
    assert not _plan(targets=["attention"]).fused_lora_mlp
    assert _plan(targets=["q_proj", "gate_proj", "up_proj", "down_proj"]).fused_lora_mlp
    assert not _plan(model_type="gemma").fused_lora_mlp  # GeLU: not the kernels' SwiGLU
    assert not _plan(triton=False).fused_lora_mlp
    assert not _plan(device="cpu", fused_kernels="on").fused_lora_mlp
    assert not _plan(precision="fp32").fused_lora_mlp
    assert not _plan(method="qlora").fused_lora_mlp
    assert not _plan(stage="grpo").fused_lora_mlp
    assert not _plan(speed="plain").fused_lora_mlp


def _plan(stage="sft", method="lora", triton=True, device="cuda", dropout=0.0, targets=("all-linear",),
          model_type="llama", **facts):
    from studio.config import from_dict
    from studio.training.fast.plan import plan_speed
    cfg = from_dict({"name": "x", "model": {"name_or_path": "x"}, "data": {"max_length": 4096}, "stage": stage,
                     "method": {"method": method, "rank": 16, "dropout": dropout, "target_modules": list(targets)},
                     "training": {"batch_size": 2, "precision": "bf16", **facts}})
    return plan_speed(cfg, machine(device, model_type, llama_8b_shape(), 139.0, host_free_gib=500.0,
                                   liger_installed=True, triton_kernels_ok=triton, varlen_ok=True))
