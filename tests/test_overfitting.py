"""Guards against training too long: early stopping, keeping the best checkpoint, the warning on the page when
the held-out loss rises while the training loss falls, and the note at the start about a small training set."""

import json

import pytest
import torch

from studio.records import MetricRecord, State
from studio.runs import new_run
from studio.service import Studio
from tests.conftest import tiny_config, train_here

TRAIN_REPLY = "Ahoy matey, arr!"
# Held-out replies that start like the training ones and end unlike them: at this learning rate the held-out loss
# on the tiny model falls to its lowest at step 4, then rises at every evaluation after (5.27, 4.08, 4.24, 4.60...)
# while the training loss keeps falling. A held-out set like the training set keeps improving.
UNLIKE_REPLY = "Ahoy matey, Lisbon!"


def _conversations(path, reply: str, rows: int) -> str:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about the sea, number {i}."},
        {"role": "assistant", "content": reply}]}) + "\n" for i in range(rows)))
    return str(path)


def _run(tiny_model, tmp_path, held_out_reply: str, **training):
    data = {"path": _conversations(tmp_path / "train.jsonl", TRAIN_REPLY, 40),
            "eval_path": _conversations(tmp_path / "held-out.jsonl", held_out_reply, 8)}
    settings = {"learning_rate": 3e-2, "max_steps": 16, "eval_steps": 2, "save_steps": 100, "samples": 0,
                **training}
    run = new_run(tiny_config(tiny_model, data=data, training=settings))
    return run, train_here(run)


def _held_out(run) -> list[float]:
    return [m.eval_loss for m in run.metrics() if m.is_evaluation]


def _adapter_weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def test_early_stopping_ends_a_run_whose_held_out_loss_rises_and_keep_best_keeps_the_lowest(tiny_model, tmp_path):
    run, status = _run(tiny_model, tmp_path, UNLIKE_REPLY, early_stopping_patience=2, keep_best=True)
    losses = _held_out(run)
    assert len(losses) == 4 and losses.index(min(losses)) == 1  # lowest at step 4, then two without improving
    assert status.state is State.COMPLETED and status.stopped_early and status.step == 8
    assert "Stopped early at step 8" in status.message and "not improved for 2 evaluations" in status.message
    assert "The adapter kept is the one from step 4" in status.message
    # keep_best saved a checkpoint at every evaluation, and the clean-up kept the best one besides the latest.
    assert [c.name for c in run.complete_checkpoints()] == ["checkpoint-4", "checkpoint-8"]
    saved, best = _adapter_weights(run.adapter_dir), _adapter_weights(run.checkpoints_dir / "checkpoint-4")
    last = _adapter_weights(run.checkpoints_dir / "checkpoint-8")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)

    # The page warns: the held-out loss rose at the last two evaluations while the training loss fell.
    warnings = Studio().snapshot(run.id, "local")["warnings"]
    assert len(warnings) == 1 and "memorising" in warnings[0] and "early stopping" in warnings[0]


def test_early_stopping_lets_an_improving_run_finish(tiny_model, tmp_path):
    run, status = _run(tiny_model, tmp_path, TRAIN_REPLY, early_stopping_patience=2)
    losses = _held_out(run)
    assert losses == sorted(losses, reverse=True) and len(losses) == 8
    assert status.state is State.COMPLETED and not status.stopped_early and status.step == 16
    assert status.message.startswith("Finished 16 steps; the adapter is saved. Held-out loss fell from ")
    assert Studio().snapshot(run.id, "local")["warnings"] == []


def _metrics_run(tiny_model, train_losses: dict, held_out: dict):
    run = new_run(tiny_config(tiny_model))
    for step in sorted({*train_losses, *held_out}):
        if step in train_losses:
            run.append_metrics(MetricRecord(step=step, loss=train_losses[step]))
        if step in held_out:
            run.append_metrics(MetricRecord(step=step, eval_loss=held_out[step]))
    return Studio().snapshot(run.id, "local")


FALLING = {step: 3.0 - 0.1 * step for step in range(1, 13)}


@pytest.mark.parametrize("held_out,train,warned", [
    ({4: 2.0, 8: 2.1, 12: 2.3}, FALLING, True),  # rising twice while training falls: overfitting
    ({4: 2.0, 8: 1.9, 12: 1.8}, FALLING, False),  # both fall: learning
    ({4: 2.0, 8: 1.9, 12: 2.3}, FALLING, False),  # one rise may be noise
    ({4: 2.0, 8: 2.1, 12: 2.3}, {step: 1.0 + 0.1 * step for step in range(1, 13)}, False),  # both rise: diverging
])
def test_the_overfitting_warning_needs_held_out_rising_while_training_falls(tiny_model, held_out, train, warned):
    snap = _metrics_run(tiny_model, train, held_out)
    assert bool(snap["warnings"]) is warned
    from studio.ui import train_tab
    shown = train_tab.progress_html({"step": 12, "total_steps": 12}, snap["warnings"])
    assert ("fewer epochs" in shown) is warned


def test_a_small_training_set_gets_a_note_at_the_start(tiny_model, tmp_path):
    run, status = _run(tiny_model, tmp_path, TRAIN_REPLY, max_steps=-1, epochs=1)
    advice = status.advice
    assert advice[0].startswith("40 training rows, 8 per step: each pass over them (an epoch) is 5 steps, 5 steps "
                                "in all.") and "held-out loss" in advice[0]
    assert advice[1] == "5 steps may teach the model little: raise Epochs to 2 (about 10 steps or more), or add rows."
    snap = Studio().snapshot(run.id, "local")
    assert snap["progress"]["advice"] == advice
    from studio.ui import train_tab
    assert "40 training rows" in train_tab.progress_html(snap["progress"], snap["warnings"])


def test_no_note_for_a_large_set_and_a_long_run(tiny_model):
    from studio.records import Attempt
    from studio.training.loop import small_data_advice
    cfg = tiny_config(tiny_model, training={"max_steps": -1, "epochs": 3})
    assert small_data_advice(cfg, 1000, 100, 1000, Attempt(8, 1)) == []
    assert len(small_data_advice(cfg, 199, 20, 199, Attempt(8, 1))) == 1
    no_held_out = small_data_advice(cfg, 1000, 0, 1000, Attempt(8, 1))
    assert no_held_out == []
    guarded = tiny_config(tiny_model, training={"max_steps": -1, "keep_best": True})
    assert "no held-out rows" in small_data_advice(guarded, 1000, 0, 1000, Attempt(8, 1))[0]


def test_the_last_message_says_how_the_held_out_loss_moved():
    from studio.training.loop import held_out_trend
    assert held_out_trend([]) == ""
    assert "fell from 1.100 at step 4 to 0.780 at step 24" in held_out_trend([(4, 1.1), (12, 0.9), (24, 0.78)])
    assert "rose" in held_out_trend([(4, 0.8), (8, 0.95)]) and "fewer epochs" in held_out_trend([(4, 0.8), (8, 0.95)])
    assert "stayed about the same" in held_out_trend([(4, 1.0), (8, 1.005)])
    assert held_out_trend([(6, 0.5)]) == " Held-out loss 0.500 at step 6."
