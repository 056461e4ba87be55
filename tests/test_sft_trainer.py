"""StudioSFTTrainer: TRL's loss and metrics, without waiting on the GPU in a training step."""

import sys

import pytest
import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from studio.training.fast.sft_trainer import TOKEN_COUNT, CountRealTokens
from tests.conftest import sft_trainer, tiny_config

WAITS = ("item", "tolist", "__bool__", "__int__", "__float__")  # on a GPU tensor, each waits for the GPU


@pytest.fixture()
def trainer_and_batch(tiny_model):
    trainer, _ = sft_trainer(tiny_config(tiny_model, training={"batch_size": 4}))
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def _count_waits(monkeypatch, calls: list) -> None:
    """Record every tensor-to-Python conversion made directly by a compute_loss (TRL's or the studio's)."""
    for name in WAITS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("sft_trainer.py"):
                calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)


def test_same_loss_and_metrics_as_trl_without_host_waits(trainer_and_batch, monkeypatch):
    trainer, batch = trainer_and_batch
    model = trainer.model
    assert batch[TOKEN_COUNT] == int(batch["attention_mask"].sum())  # padded rows: the count skips the padding
    calls = []
    _count_waits(monkeypatch, calls)
    for num_items in (None, torch.tensor(37)):
        reference_batch = {k: v for k, v in batch.items() if k != TOKEN_COUNT}
        with torch.no_grad():
            reference = SFTTrainer.compute_loss(trainer, model, reference_batch, num_items_in_batch=num_items)
        assert calls, "TRL's compute_loss converts its metrics to floats (what this trainer avoids)"
        expected = {k: trainer._metrics["train"][k][-1] for k in ("entropy", "mean_token_accuracy")}
        trainer._metrics["train"].clear()
        calls.clear()
        seen = trainer.state.num_input_tokens_seen
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
            loss_again = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        assert calls == [], f"compute_loss waited on the device: {calls}"
        assert torch.allclose(loss, reference) and torch.allclose(loss_again, reference)
        assert trainer.state.num_input_tokens_seen == seen + 2 * batch[TOKEN_COUNT]
        assert "entropy" not in trainer._metrics["train"]  # not before a logging step
        trainer.log({"loss": float(loss)})
        logged = trainer.state.log_history[-1]
        for name, value in expected.items():  # the mean over the two micro-batches, as TRL logs it
            assert logged[name] == pytest.approx(value, rel=1e-5)
        assert trainer._metric_count == 0


def test_the_head_projects_only_labelled_positions_with_the_same_loss_and_gradients(trainer_and_batch, monkeypatch):
    """On the CPU TRL's fused head projects every position; the studio's trainer projects only those with a label
    (as TRL does on GPUs), and the loss and every LoRA gradient are TRL's."""
    import trl.trainer.utils as trl_utils
    trainer, batch = trainer_and_batch
    model = trainer.model
    projected = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        projected.append(hidden.shape[0])
        return original(hidden, *args)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_gradients(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]
    reference_batch = {k: v for k, v in batch.items() if k != TOKEN_COUNT}
    reference, reference_grads = loss_and_gradients(lambda: SFTTrainer.compute_loss(trainer, model,
                                                                                    dict(reference_batch)))
    loss, grads = loss_and_gradients(lambda: trainer.compute_loss(model, dict(batch)))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    every = batch["labels"].shape[0] * (batch["labels"].shape[1] - 1)
    assert projected == [every, labelled] and labelled < every
    assert torch.allclose(loss, reference, rtol=1e-5)
    for got, expected in zip(grads, reference_grads):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # TRL's own choice is back afterwards


def test_token_count_of_packed_rows_leaves_out_the_padding():
    collator = CountRealTokens(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                                               return_position_ids=True, pad_to_multiple_of=64))
    examples = [{"input_ids": list(range(1, 11))}, {"input_ids": list(range(1, 24))}]
    batch = collator(examples)
    assert batch[TOKEN_COUNT] == 33
    assert batch["input_ids"].numel() == 64


def test_outside_plain_training_trl_computes_it(trainer_and_batch):
    trainer, batch = trainer_and_batch
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))  # the count is taken out, TRL's path runs
    assert torch.isfinite(loss)
    assert trainer.state.num_input_tokens_seen == 0  # evaluation tokens are not training tokens


def test_training_mode_is_walked_only_after_evaluation(trainer_and_batch, monkeypatch):
    """`model.train()` walks thousands of modules; it runs on the first step and after an evaluation (which
    puts the model in eval mode), and is skipped while every module is still in training mode."""
    trainer, batch = trainer_and_batch
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    walks = []
    original = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walks.append(mode) or original(self, mode))

    def step_walked() -> bool:
        walks.clear()
        trainer.training_step(model, dict(batch))
        return bool(walks)

    model.eval()
    assert step_walked() and all(m.training for m in model.modules())
    assert not step_walked()
    assert "train" not in vars(model)  # the skip is undone after the step
    model.eval()  # what the Trainer's evaluation does
    assert step_walked() and all(m.training for m in model.modules())


def test_flop_estimate_and_clipping_match_the_trainer(trainer_and_batch, monkeypatch):
    from transformers import Trainer
    trainer, batch = trainer_and_batch
    counted = []
    base_class = type(trainer.model.get_base_model())  # PEFT forwards the call to the base model
    original = base_class.num_parameters
    monkeypatch.setattr(base_class, "num_parameters",
                        lambda self, *a, **k: counted.append(1) or original(self, *a, **k))
    expected = Trainer.floating_point_ops(trainer, batch)
    counted.clear()
    assert expected > 0
    assert trainer.floating_point_ops(batch) == expected == trainer.floating_point_ops(batch)
    assert len(counted) == 1  # counted once, not on every micro-batch

    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    grads = [torch.randn_like(p) * 10 for p in trainable]
    results = []
    for clip in (Trainer._clip_grad_norm, type(trainer)._clip_grad_norm):
        for p, g in zip(trainable, grads):
            p.grad = g.clone()
        results.append((clip(trainer, trainer.model), [p.grad.clone() for p in trainable]))
    (norm, clipped), (studio_norm, studio_clipped) = results
    assert norm > trainer.args.max_grad_norm  # clipping did something
    torch.testing.assert_close(studio_norm, norm)
    for a, b in zip(studio_clipped, clipped):
        torch.testing.assert_close(a, b)


def test_a_trl_without_the_fused_head_fields_gets_trls_own_loss(trainer_and_batch, monkeypatch):
    """Written against TRL 1.16's fused LM head: if a TRL lacks its fields, TRL computes the loss (and its
    metrics, waits included) rather than this trainer failing."""
    from studio.training.fast import sft_trainer
    trainer, batch = trainer_and_batch
    monkeypatch.setattr(sft_trainer, "_FUSED_HEAD_FIELDS", False)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.isfinite(loss)
    assert trainer._metric_count == 0 and trainer._metrics["train"]["entropy"]  # TRL's own bookkeeping ran
