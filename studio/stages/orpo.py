"""ORPO: supervised fine-tuning on the chosen replies and preference in one loss (an odds-ratio term against
the rejected replies), with no reference model at all. Reads preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, LiveMetric, Stage


@dataclass
class OrpoSettings:
    beta: float = setting(
        0.1, "Weight of the preference (odds-ratio) term beside learning the chosen replies; 0.1 as in the paper.",
        minimum=0.001, maximum=10.0)


LIVE = (LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss"),
        LiveMetric("rewards/margins", "reward margin (chosen - rejected)", "stage"),
        LiveMetric("rewards/accuracies", "chosen beats rejected (share)", "stage"))


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from studio.stages import common
    return common.build(ORPOTrainer, ORPOConfig, prep, arguments, callbacks,
                        {"beta": job.config.settings_of("orpo").beta, "max_length": prep.cfg.data.max_length})


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "preference_pairs", build, LIVE)


STAGE = Stage(
    name="orpo", label="ORPO (preferences, no SFT first)", data_kind="preference_pairs", run=run,
    settings=OrpoSettings, live_metrics=LIVE,
    help="Learn the chosen replies and prefer them over the rejected ones in one go, without a separate "
         "supervised fine-tuning run first.")
