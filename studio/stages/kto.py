"""KTO: learn from replies labelled good or bad one at a time (no pairs needed), against the model as it
started (the same weights with the adapter switched off). Reads feedback; pairs are read as one good and one
bad reply each."""

from __future__ import annotations

from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, LiveMetric, Stage


@dataclass
class KtoSettings:
    beta: float = setting(0.1, "How far the model may move from where it started; lower lets it move further.",
                          minimum=0.001, maximum=10.0)
    desirable_weight: float = setting(1.0, "Weight of the good replies' term (raise it when good replies are "
                                           "fewer than bad ones).", minimum=0.01, maximum=100.0)
    undesirable_weight: float = setting(1.0, "Weight of the bad replies' term.", minimum=0.01, maximum=100.0)


LIVE = (LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss"),
        LiveMetric("rewards/chosen", "reward of good replies", "stage"),
        LiveMetric("rewards/rejected", "reward of bad replies", "stage"),
        LiveMetric("rewards/margins", "reward margin (good - bad)", "stage"),
        LiveMetric("kl", "KL from the start", "stage"))


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl import KTOConfig, KTOTrainer

    from studio.stages import common
    s = job.config.settings_of("kto")
    return common.build(KTOTrainer, KTOConfig, prep, arguments, callbacks,
                        {"beta": s.beta, "desirable_weight": s.desirable_weight,
                         "undesirable_weight": s.undesirable_weight, "max_length": prep.cfg.data.max_length})


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "feedback", build, LIVE)


STAGE = Stage(name="kto", label="KTO (good/bad labels)", data_kind="feedback", run=run, settings=KtoSettings,
              live_metrics=LIVE,
              help="Teach from replies marked good or bad, each on its own: for thumbs-up/thumbs-down data.")
