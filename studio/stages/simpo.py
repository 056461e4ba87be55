"""SimPO and CPO (TRL's CPOTrainer): preference learning without a reference model. SimPO scores a reply by
its length-normalised log-probability and asks for a margin (gamma); CPO adds learning the chosen replies.
Reads preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, LiveMetric, Stage


@dataclass
class SimpoSettings:
    loss: str = setting("simpo", "'simpo': SimPO; 'sigmoid': CPO's loss; 'hinge' and 'ipo': their variants.",
                        choices=("simpo", "sigmoid", "hinge", "ipo"))
    beta: float = setting(2.0, "Scale of the preference reward; SimPO's paper uses 2.0 to 2.5.", minimum=0.001,
                          maximum=20.0)
    gamma: float = setting(0.5, "SimPO's target margin between chosen and rejected (gamma / beta in the paper).",
                           minimum=0.0, maximum=10.0)
    sft_weight: float = setting(0.0, "Weight of learning the chosen replies as in supervised fine-tuning "
                                     "(CPO's alpha); 0 for plain SimPO.", minimum=0.0, maximum=10.0)


LIVE = (LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss"),
        LiveMetric("rewards/margins", "reward margin (chosen - rejected)", "stage"),
        LiveMetric("rewards/accuracies", "chosen beats rejected (share)", "stage"))


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from studio.stages import common
    s = job.config.settings_of("simpo")
    return common.build(CPOTrainer, CPOConfig, prep, arguments, callbacks,
                        {"loss_type": s.loss, "beta": s.beta, "simpo_gamma": s.gamma, "cpo_alpha": s.sft_weight,
                         "max_length": prep.cfg.data.max_length})


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "preference_pairs", build, LIVE)


STAGE = Stage(name="simpo", label="SimPO / CPO (preferences, no reference)", data_kind="preference_pairs", run=run,
              settings=SimpoSettings, live_metrics=LIVE,
              help="Prefer the chosen replies without keeping a reference to the starting model: lighter than DPO.")
