"""DPO: learn to prefer the chosen reply over the rejected one, against the model as it started (the
reference: the same weights with the new adapter switched off). Loss variants from TRL: sigmoid (DPO), IPO,
hinge (SLiC), robust, BCO and others.

Reads preference pairs. Its curves: the rewards of chosen and rejected replies, their margin, and how often
chosen beats rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, LiveMetric, Stage

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")


@dataclass
class DpoSettings:
    beta: float = setting(
        0.1, "How far the model may move from where it started to prefer the chosen replies: lower lets it move "
        "further. 0.1 is the usual start; for IPO it is the regularisation strength.", minimum=0.001, maximum=10.0)
    loss: str = setting(
        "sigmoid", "Which preference loss: 'sigmoid' is DPO; 'ipo' stays closer to the start on small data; "
        "'hinge' is SLiC; 'robust' tolerates some wrongly-labelled pairs; the others are research variants.",
        choices=LOSSES)
    sft_weight: float = setting(
        0.0, "Also learn the chosen replies as in supervised fine-tuning, with this weight (RPO). Keeps replies "
        "fluent when the pairs differ only a little; 0: plain preference loss.", minimum=0.0, maximum=10.0)


LIVE = (LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss"),
        LiveMetric("rewards/margins", "reward margin (chosen - rejected)", "stage"),
        LiveMetric("rewards/accuracies", "chosen beats rejected (share)", "stage"),
        LiveMetric("rewards/chosen", "reward of chosen", "stage"),
        LiveMetric("rewards/rejected", "reward of rejected", "stage"))


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl import DPOConfig, DPOTrainer

    from studio.stages import common
    from studio.training.fast import apply
    apply.adapt_for_stage(prep.model, prep.plan, "dpo")  # before the trainer: its reference pass runs the same way
    settings = job.config.settings_of("dpo")
    losses = {"loss_type": [settings.loss]}
    if settings.sft_weight:
        losses = {"loss_type": [settings.loss, "sft"], "loss_weights": [1.0, settings.sft_weight]}
    return common.build(DPOTrainer, DPOConfig, prep, arguments, callbacks,
                        {"beta": settings.beta, "max_length": prep.cfg.data.max_length, **losses})


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "preference_pairs", build, LIVE)


STAGE = Stage(
    name="dpo", label="DPO (preferences)", data_kind="preference_pairs", run=run, settings=DpoSettings,
    help="Teach the model which of two replies is better, from pairs of a chosen and a rejected reply. Usually "
         "after supervised fine-tuning (set model.start_from to that run).",
    live_metrics=LIVE, demo_preset="demo-dpo")
