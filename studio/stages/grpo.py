"""GRPO: the model writes several replies to each prompt, the rewards score them, and it learns to write more
like the better ones (against where it started, the same weights with the adapter switched off). The rewards
are chosen and weighted here (studio/rewards.py), no code needed. Reads prompts, with an optional reference
answer.

Its curves: the mean reward, each reward's own, the replies' length and the KL from the start. At each
evaluation a few replies with their rewards go to the run's samples.jsonl, shown on the Train tab.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from studio.config import setting
from studio.stages import Job, LiveMetric, Stage

SAMPLES_KEPT = 8
SAMPLE_CHARS = 2000
# Evaluating writes num_generations replies to every held-out prompt: on a CPU 20 prompts took longer than 8
# training steps. The first few prompts keep the held-out curve and cost little.
EVAL_PROMPTS = 8


@dataclass
class GrpoSettings:
    num_generations: int = setting(4, "Replies written per prompt and compared with each other; more gives a "
                                      "clearer signal and costs time.", minimum=2, maximum=64)
    max_completion_length: int = setting(64, "Longest reply written while training, in tokens.", minimum=4,
                                         maximum=32768)
    temperature: float = setting(1.0, "How varied the replies are while training; the comparison needs some "
                                      "variety.", minimum=0.05, maximum=2.0)
    beta: float = setting(0.04, "How strongly the model is held near where it started (the KL term); 0 lets it "
                                "move freely.", minimum=0.0, maximum=10.0)
    regex: str = setting("", "Reward replies that match this regular expression (a format), e.g. ^Ahoy or "
                             "\\\\boxed\\{.+\\}. Empty: off.")
    regex_weight: float = setting(1.0, "Weight of the regex reward.", minimum=0.0, maximum=100.0)
    answer_match: str = setting("off", "Reward replies that match the reference answer column: 'exact', "
                                       "'numeric' (the last number in the reply), or 'contains'.",
                                choices=("off", "exact", "numeric", "contains"))
    answer_weight: float = setting(1.0, "Weight of the answer reward.", minimum=0.0, maximum=100.0)
    length_target_words: int = setting(0, "Reward replies of about this many words (0: off).", minimum=0,
                                       maximum=100000)
    length_weight: float = setting(1.0, "Weight of the length reward.", minimum=0.0, maximum=100.0)
    json_weight: float = setting(0.0, "Weight of a reward for replies that are valid JSON (0: off).", minimum=0.0,
                                 maximum=100.0)
    must_contain: str = setting("", "Reward replies that contain these words (comma-separated).")
    must_not_contain: str = setting("", "Penalise replies that contain these words (comma-separated).")
    words_weight: float = setting(1.0, "Weight of the words reward.", minimum=0.0, maximum=100.0)
    reward_run: str = setting("", "A finished reward-model run (its run id) whose score is a reward.")
    reward_run_weight: float = setting(1.0, "Weight of the reward model's score.", minimum=0.0, maximum=100.0)
    reward_code: str = setting("", "A Python file with reward(prompts, completions, **columns) -> list of numbers. "
                                   "It runs that code, so only on your own machine, never on a shared link.")
    code_weight: float = setting(1.0, "Weight of the code reward.", minimum=0.0, maximum=100.0)


LIVE = (LiveMetric("reward", "mean reward", "stage"), LiveMetric("completions/mean_length", "reply length (tokens)",
                                                                  "stage"),
        LiveMetric("kl", "KL from the start", "stage"), LiveMetric("loss", "training loss"))
PER_REWARD = ("regex", "answer", "length", "json", "words", "reward_model", "code")


class _Recorder:
    """Keeps the last replies the rewards scored, with their scores, for the samples at each evaluation."""

    def __init__(self):
        self.latest: list[dict] = []

    def wrap(self, reward):
        def scored(prompts, completions, **columns):
            from studio.rewards import text_of
            values = reward.function(prompts=prompts, completions=completions, **columns)
            # The page shows these on every refresh: long replies are cut (the rewards saw them whole).
            rows = [{"prompt": text_of(p[-1:] if isinstance(p, list) else p)[:SAMPLE_CHARS],
                     "reply": text_of(c)[:SAMPLE_CHARS]} for p, c in zip(prompts, completions)]
            for row, value in zip(rows, values):
                row[reward.name] = None if value is None or (isinstance(value, float) and math.isnan(value)) \
                    else round(float(value), 3)
            self._merge(rows)
            return values
        scored.__name__ = reward.function.__name__
        return scored

    def _merge(self, rows: list[dict]) -> None:
        # Each reward sees the same batch in turn: merge their columns row by row.
        if len(self.latest) == len(rows) and all(a["reply"] == b["reply"] for a, b in zip(self.latest, rows)):
            for mine, new in zip(self.latest, rows):
                mine.update(new)
        else:
            self.latest = rows


def _sample_callback(run, recorder: _Recorder, every: int):
    from transformers import TrainerCallback

    class WriteSamples(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 and recorder.latest and run.keeps_records:
                with open(run.path / "samples.jsonl", "a", encoding="utf-8") as fh:
                    for row in recorder.latest[:SAMPLES_KEPT]:
                        fh.write(json.dumps({"step": state.global_step, **row}) + "\n")
    return WriteSamples()


def trainer_class():
    """TRL's GRPOTrainer, generating through `studio.training.fast.generation` where `decoding` says so (on a GPU
    with a speed plan: each decoding step replayed as a CUDA graph, bench/NOTES.md); otherwise TRL's own path."""
    from trl import GRPOTrainer

    from studio.training.fast import generation

    class StudioGRPOTrainer(GRPOTrainer):
        # "graphs": static cache, decoding steps as CUDA graphs; "eager": the same path without graphs (tests, the
        # CPU); "off": TRL's own generate (dynamic cache, every kernel launched from Python).
        decoding = "off"
        decode_stats = None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
            if self.decoding == "off" or images is not None or multimodal_fields \
                    or generation.unsupported(self, prompt_ids) is not None:
                return super()._generate_single_turn(*args)
            if self.decode_stats is None:
                self.decode_stats = generation.DecodeStats()
            with generation.graphed_generation(self, self.decoding == "graphs", self.decode_stats):
                return super()._generate_single_turn(*args)

    return StudioGRPOTrainer


def build(prep, job: Job, arguments: dict, callbacks: list):
    from trl import GRPOConfig

    from studio import rewards
    from studio.limits import Limits
    from studio.stages import common
    s = job.config.settings_of("grpo")
    scorer = rewards.reward_model_scorer(s.reward_run, prep.tokenizer, prep.device) if s.reward_run else None
    chosen = rewards.build(s, shared=Limits.from_env() is not None, reward_model=scorer)
    recorder = _Recorder()
    # Each step's batch holds whole groups of replies to the same prompt.
    batch = math.ceil(arguments["per_device_train_batch_size"] / s.num_generations) * s.num_generations
    arguments = {**arguments, "per_device_train_batch_size": batch, "per_device_eval_batch_size": batch}
    from studio.training.loop import steps_plan
    _, eval_every, _ = steps_plan(job.config, prep.rows)
    prep.eval.rows = prep.eval.rows[:EVAL_PROMPTS]
    trainer = common.build(trainer_class(), GRPOConfig, prep, arguments,
                           [*callbacks, _sample_callback(job.run, recorder, eval_every)],
                           {"num_generations": s.num_generations, "max_completion_length": s.max_completion_length,
                            "temperature": s.temperature, "beta": s.beta,
                            "reward_weights": [r.weight for r in chosen]},
                           reward_funcs=[recorder.wrap(r) for r in chosen])
    # Generation is most of a GRPO step, one token per forward pass, bound by the host's kernel launches: where the
    # plan says so (a GPU), each decoding step is replayed as a CUDA graph (the same forward and sampling; a static
    # KV cache).
    trainer.decoding = "graphs" if prep.plan.graphed_decoding else "off"
    return trainer


ALL_LIVE = (*LIVE, *(LiveMetric(f"rewards/{name}/mean", f"reward: {name}", "stage") for name in PER_REWARD))


def run(job: Job):
    from studio.stages import common
    return common.run_with(job, "prompts", build, ALL_LIVE, row_factor=job.config.settings_of("grpo").num_generations)


STAGE = Stage(
    name="grpo", label="GRPO (rewards)", data_kind="prompts", run=run, settings=GrpoSettings, live_metrics=ALL_LIVE,
    demo_preset="demo-grpo",
    help="Let the model write several replies to each prompt and learn from the ones your rewards score best: "
         "a format, a correct answer, a length, valid JSON, words to use or avoid, or a reward model.")
