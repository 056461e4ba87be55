"""The LM head that keeps its logits for the backward (studio/training/fast/lm_head.py): the same numbers as a
float64 reference and as TRL's chunked head, through the trainer too, and the planner's rule for when it is used."""

import pytest
import torch

from studio.training.fast import lm_head
from studio.training.fast.memory import kept_logits_gib
from tests.conftest import llama_8b_shape
from tests.interpreter import passes_under_the_interpreter


def _case(rows=37, hidden=16, vocab=10_000, bias=False, dtype=torch.float64, seed=0):
    """Hidden states, head and labels with two exact ties for the top logit: on row 0 the label is the first of
    two equal maxima (top-1), on row 1 the second (not top-1, as TRL counts it)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.5
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    ties = ((11, vocab - 5), (23, vocab - 7))  # with 10,000 entries the second of each is two kernel blocks later
    for row, (first, second) in enumerate(ties):
        w[first] = h[row] * 3  # far above every other logit of the row
        w[second] = w[first]
        if b is not None:
            b[second] = b[first]
    labels[0], labels[1] = ties[0][0], ties[1][1]
    return h, w, b, labels


def _reference(h, w, b, labels, rounded_to=None):
    """Float64 log-probabilities, entropy and top-1; with `rounded_to`, of the logits rounded to that type as a
    16-bit head holds them (the product rounded, then the bias added and rounded again, as in TRL's head)."""
    def rounded(x):
        return x if rounded_to is None else x.to(rounded_to).double()
    logits = rounded(h @ w.T)
    if b is not None:
        logits = rounded(logits + b)
    log_p = torch.log_softmax(logits, -1)
    return (log_p.gather(1, labels[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1),
            logits.argmax(-1) == labels)


def _check_against_reference(rows=37, vocab=10_000, bias=True):
    h, w, b, labels = _case(rows=rows, vocab=vocab, bias=bias)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b) if t is not None]
    ref_leaves = [t.clone().requires_grad_(True) for t in (h, w, b) if t is not None]
    log_p, entropy, top1 = lm_head.KeptLogitsHead.apply(*leaves[:2], leaves[2] if bias else None, labels)
    ref_log_p, ref_entropy, ref_top1 = _reference(*ref_leaves[:2], ref_leaves[2] if bias else None, labels)
    weights = torch.linspace(-1, 2, rows, dtype=torch.float64)
    (log_p * weights).sum().backward()
    (ref_log_p * weights).sum().backward()
    # The statistics are float32 sums over the vocabulary, as TRL's are.
    assert torch.allclose(log_p.double(), ref_log_p.detach(), atol=2e-5)
    assert torch.allclose(entropy.double(), ref_entropy.detach(), atol=2e-5)
    assert top1.tolist() == ref_top1.tolist() and top1[0] and not top1[1]
    assert not entropy.requires_grad and not top1.requires_grad  # metrics only
    for got, want in zip(leaves, ref_leaves):
        assert torch.allclose(got.grad, want.grad, atol=2e-5), (got.grad - want.grad).abs().max()


def _check_16_bit_against_reference(dtype=torch.bfloat16):
    """The kernels' 16-bit loads and stores, as on a GPU: against float64 arithmetic on the same inputs with the
    logits rounded to 16 bits (the log-probabilities and entropy then agree to float32 sums), and the gradients
    (stored in 16 bits) within a few 16-bit steps. Rows 2 on: the rows with ties have logits near 48, where one bf16
    step is 0.25, so their rounding may differ between the two matmuls."""
    h, w, b, labels = (t if t is None or not t.is_floating_point() else t.to(dtype) for t in _case(bias=True))
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    log_p, entropy, top1 = lm_head.KeptLogitsHead.apply(*leaves, labels)
    assert log_p.dtype == torch.float32 and leaves[0].dtype == dtype
    ref_leaves = [t.double().requires_grad_(True) for t in (h, w, b)]
    ref_log_p, ref_entropy, _ = _reference(*ref_leaves, labels, rounded_to=dtype)
    weights = torch.linspace(-1, 2, len(labels), dtype=torch.float64)
    (log_p * weights.float()).sum().backward()
    (ref_log_p * weights).sum().backward()
    assert (log_p[2:].double() - ref_log_p[2:]).abs().max() < 1e-4
    assert (entropy[2:].double() - ref_entropy[2:]).abs().max() < 1e-4
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert (got.grad.double() - want.grad).abs().max() <= 0.02 * want.grad.abs().max()


@pytest.mark.parametrize("bias", [False, True])
def test_the_pytorch_path_matches_a_float64_reference_over_several_tiles(monkeypatch, bias):
    monkeypatch.setattr(lm_head, "triton_runs", lambda device: False)
    monkeypatch.setattr(lm_head, "TILE_VALUES", 8 * 10_000)  # 37 rows of 10,000: five tiles, the last one short
    _check_against_reference(bias=bias)
    _check_16_bit_against_reference(torch.bfloat16)
    _check_16_bit_against_reference(torch.float16)


def test_the_triton_kernels_match_the_reference_under_the_interpreter():
    """The kernels that run on GPUs, run by triton's interpreter on this CPU, in a process of their own (the
    interpreter is chosen when triton is imported). Vocabulary 10,000: three blocks of 4,096, the last one short."""
    passes_under_the_interpreter(
        "import torch\nfrom studio.training.fast import lm_head\nfrom tests.test_lm_head import "
        "_check_against_reference\nassert lm_head.triton_runs(torch.device('cpu'))\n"
        "_check_against_reference(rows=9, bias=True)\n_check_against_reference(rows=5, vocab=4096, bias=False)\n"
        "from tests.test_lm_head import _check_16_bit_against_reference\n"
        "_check_16_bit_against_reference(torch.bfloat16)\n_check_16_bit_against_reference(torch.float16)")


def test_one_backward_per_forward():
    h, w, _, labels = _case(rows=4, vocab=300)
    h.requires_grad_(True)
    log_p, _, _ = lm_head.KeptLogitsHead.apply(h, w, None, labels)
    log_p.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        log_p.sum().backward()


def test_in_trls_place_it_gives_trls_results_and_hands_other_calls_to_trl():
    import trl.trainer.utils as trl_utils
    trl_function = trl_utils._ChunkedLogProbFunction
    h, w, b, labels = (t if t is None or not t.is_floating_point() else t.to(torch.bfloat16)
                       for t in _case(rows=33, hidden=24, vocab=5_000, bias=True, dtype=torch.float32))
    outputs = ("log_probs", "entropy", "is_top1")
    head = lm_head.TRLHeadWithKeptLogits(trl_function)
    results = []
    for function in (trl_function, head):
        hidden = h.clone().requires_grad_(True)
        log_p, entropy, sum_sq, mean, top1 = function.apply(hidden, w, b, labels, 1.0, 1024, None, 1.0, outputs)
        assert sum_sq is None and mean is None
        log_p.sum().backward()
        results.append((log_p.detach(), entropy.detach(), top1, hidden.grad))
    (trl_log_p, trl_entropy, trl_top1, trl_grad), (log_p, entropy, top1, grad) = results
    assert torch.allclose(log_p, trl_log_p, atol=1e-5) and torch.allclose(entropy, trl_entropy, atol=1e-5)
    assert torch.equal(top1, trl_top1)
    assert (grad.float() - trl_grad.float()).abs().max() <= 0.02 * trl_grad.float().abs().max()
    calls = []

    class Recorder:
        @staticmethod
        def apply(*args):
            calls.append(args[4:])
            return trl_function.apply(*args)
    head = lm_head.TRLHeadWithKeptLogits(Recorder)
    head.apply(h, w, b, labels, 0.7, 1024, None, 1.0, outputs)  # a temperature: TRL's
    head.apply(h, w, b, labels, 1.0, 1024, 30.0, 1.0, outputs)  # soft-capped logits: TRL's
    head.apply(h, w, b, labels, 1.0, 1024, None, 1.0, ("log_probs", "mean_logits"))  # an output it lacks: TRL's
    head.apply(h.float(), w.float(), b.float(), labels, 1.0, 1024, None, 1.0, outputs)  # float32: TRL's
    head.apply(h.float(), w, b, labels, 1.0, 1024, None, 1.0, outputs)  # float32 hidden states: TRL's
    head.apply(h, w, b, labels, 1.0, 1024, None, 1.0, outputs)  # the plain call: its own
    assert len(calls) == 5


def test_through_the_trainer_the_loss_and_lora_gradients_are_trls(tiny_model):
    """The studio's trainer with the plan's switch on: its head is called in TRL's place, and the loss and every
    LoRA gradient equal those with TRL's head; afterwards TRL's function is back."""
    import trl.trainer.utils as trl_utils
    from studio.training.fast import apply
    from studio.training.fast.sft_trainer import TOKEN_COUNT
    from tests.conftest import sft_trainer, tiny_config
    trainer, prep = sft_trainer(tiny_config(tiny_model, training={"batch_size": 4}))
    trainer.model.to(torch.bfloat16).train()  # as on a GPU: this head takes 16-bit calls only
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[TOKEN_COUNT] > 0
    kept = apply.trainer_class(prep.plan.changed(head_keeps_logits=True))
    assert kept.head_keeps_logits and not apply.trainer_class(prep.plan).head_keeps_logits
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    used = []
    original_apply = lm_head.KeptLogitsHead.apply

    def spy(*args):
        used.append(args[0].shape[0])
        return original_apply(*args)

    def loss_and_gradients(keep: bool):
        trainer.head_keeps_logits = keep
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]
    original_function = trl_utils._ChunkedLogProbFunction
    reference, reference_grads = loss_and_gradients(False)
    assert used == []
    lm_head.KeptLogitsHead.apply = spy
    try:
        loss, grads = loss_and_gradients(True)
    finally:
        lm_head.KeptLogitsHead.apply = original_apply
    assert used == [int((batch["labels"][:, 1:] != -100).sum())]
    assert trl_utils._ChunkedLogProbFunction is original_function
    # Both heads round the same bf16 logits (their matmuls agree on this CPU), so the numbers agree closely.
    assert torch.allclose(loss, reference, rtol=1e-5)
    assert any(g.abs().max() > 0 for g in reference_grads)
    for got, expected in zip(grads, reference_grads):
        assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-6)


def _plan(limit: float = 0.0, stage: str = "sft", length: int = 4096, batch: int = 2, **facts):
    from studio.config import from_dict
    from studio.training.fast.plan import Machine, plan_speed
    shape = llama_8b_shape()
    cfg = from_dict({"name": "x", "model": {"name_or_path": "x"}, "data": {"max_length": length}, "stage": stage,
                     "method": {"method": "lora", "rank": 16},
                     "training": {"batch_size": batch, "memory_limit_gib": limit, "precision": "bf16", **facts}})
    machine = Machine(device="cuda", model_type="llama", shape=shape, free_gib=139.0, host_free_gib=500.0,
                      liger_installed=True, varlen_ok=True)
    return plan_speed(cfg, machine), cfg


def test_the_planner_keeps_the_logits_only_where_nothing_is_checkpointed_and_they_fit():
    from studio.training.fast.memory import FILL
    plan, _ = _plan()
    logits = kept_logits_gib(2 * 4096, 128256)
    assert plan.head_keeps_logits and not plan.gradient_checkpointing
    without, _ = _plan(speed="plain")
    assert not without.head_keeps_logits
    assert "logits kept" in plan.summary() and any("LM head: keeps" in r for r in plan.reasons)
    assert plan.memory_estimate_gib <= FILL * plan.memory_budget_gib
    assert logits == pytest.approx(1.96, abs=0.01)
    # Where layers are checkpointed, memory is short: the head projects again.
    tight, _ = _plan(limit=40.0)
    assert tight.gradient_checkpointing and not tight.head_keeps_logits
    # Around the line: nothing checkpointed, and the logits kept exactly where they fit on top of the estimate
    # (which then counts them), else not, with the reason.
    seen = set()
    for limit in (54.0, 55.0, 56.0, 57.0, 58.0):
        near, _ = _plan(limit=limit)
        if near.gradient_checkpointing:
            continue
        seen.add(near.head_keeps_logits)
        if near.head_keeps_logits:
            assert near.memory_estimate_gib <= FILL * limit
        else:
            assert near.memory_estimate_gib + logits > FILL * limit
            assert any("projects its logits again" in r for r in near.reasons)
    assert seen == {True, False}
    # Other stages (their trainers have their own heads) and float32 training (the logits would not be 16-bit).
    assert not _plan(stage="dpo")[0].head_keeps_logits
    assert not _plan(precision="fp32")[0].head_keeps_logits


def test_the_planner_counts_the_logits_in_the_estimate():
    from studio.training.fast.memory import peak_gib
    plan, _ = _plan()
    shape = llama_8b_shape()
    base = peak_gib(shape, "lora", 16, plan.micro_batch_tokens, 0, plan.liger)
    assert plan.memory_estimate_gib == pytest.approx(base + kept_logits_gib(plan.micro_batch_tokens, 128256),
                                                     abs=0.06)
