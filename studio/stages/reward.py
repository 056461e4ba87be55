"""A reward model: the base model with a one-number score head, trained (LoRA) to score the chosen reply of
each pair above the rejected one. Its adapter is a GRPO reward (grpo settings: reward_run). Reads preference
pairs; its curve is how often it ranks a held-out pair right."""

from __future__ import annotations

from studio.stages import Job, LiveMetric, Stage

LIVE = (LiveMetric("loss", "training loss"), LiveMetric("eval_loss", "held-out loss"),
        LiveMetric("accuracy", "ranks the pair right (share)", "stage"),
        LiveMetric("margin", "score margin (chosen - rejected)", "stage"))


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl import RewardConfig, RewardTrainer

    from studio.stages import common
    return common.build(RewardTrainer, RewardConfig, prep, arguments, callbacks,
                        {"max_length": prep.cfg.data.max_length})


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "preference_pairs", build, LIVE, head="score")


STAGE = Stage(name="reward", label="Reward model (for GRPO)", data_kind="preference_pairs", run=run, live_metrics=LIVE,
              produces=("reward-model",),
              help="Train a model that scores replies, from pairs of a chosen and a rejected reply; then use it as "
                   "a reward for GRPO.")
