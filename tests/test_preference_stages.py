"""The preference and RL stages train the tiny model through the worker's own code and move their own metric the
right way; the reference is the model with its adapter off; a stage started from another run starts from its
weights; rewards written as code never run on a shared studio."""

import gc
import json

import pytest
import torch

from studio.errors import StudioError
from studio.records import State
from studio.runs import new_run
from tests.conftest import tiny_config, train_here

QUESTIONS = [f"What is fact number {i}?" for i in range(40)]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    # The chosen reply always opens the same way; the rejected one never does: a preference the tiny model
    # can learn in a few steps.
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": "Ahoy, matey! Arr!", "rejected": "I do not know."})
                            + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": "Arr"}) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def stage_config(model_dir, stage, data, steps=12, lr=1e-2, **sections):
    return tiny_config(model_dir, name=stage, stage=stage, data={"path": str(data), "max_length": 64},
                       training={"max_steps": steps, "eval_steps": steps // 2, "save_steps": steps,
                                 "batch_size": 4, "learning_rate": lr}, **sections)


def series(run, key):
    return [r.extra[key] for r in run.metrics() if r.is_training and key in r.extra]


def early_late(values, n=3):
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_dpo_margin_grows_and_the_reference_is_the_adapter_off_base(tiny_model, pair_file, monkeypatch):
    from studio.stages import dpo
    seen = {}
    original = dpo.build

    def build(prep, job, arguments, callbacks):
        trainer = original(prep, job, arguments, callbacks)
        seen["ref_model"] = trainer.ref_model
        # Every causal LM alive in this process: the policy only, no second copy standing in as the reference.
        gc.collect()
        from transformers import PreTrainedModel
        seen["models"] = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
        seen["trainable"] = [n for n, p in prep.model.named_parameters() if p.requires_grad]
        seen["adapters"] = list(prep.model.peft_config)
        seen["lora_tensors"] = sum(1 for n, _ in prep.model.named_parameters() if "lora_" in n)
        return trainer

    monkeypatch.setattr(dpo, "build", build)
    run = new_run(stage_config(tiny_model, "dpo", pair_file, steps=12))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert seen["ref_model"] is None
    assert len({id(m.base_model) if hasattr(m, "base_model") else id(m) for m in seen["models"]}) == 1, seen["models"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    # No frozen copy of the adapter either: the reference pass switches the one adapter off.
    assert seen["adapters"] == ["default"] and seen["lora_tensors"] == len(seen["trainable"])
    margins = series(run, "rewards/margins")
    assert len(margins) >= 6
    assert abs(margins[0]) < 1e-4  # the first step's policy is its reference: the reference is where it started
    first, last = early_late(margins)
    assert last > first and last > 0, margins
    assert series(run, "rewards/accuracies")[-1] > 0.5
    assert run.has_adapter()
    assert run.read_json("data.json")["format"] == "preference"


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_dpo_loss_variants_train(tiny_model, pair_file, loss):
    run = new_run(stage_config(tiny_model, "dpo", pair_file, steps=6, dpo={"loss": loss, "beta": 0.2}))
    assert train_here(run).state is State.COMPLETED
    first, last = early_late(series(run, "rewards/margins"), 2)
    assert last > first


def test_kto_learns_good_from_bad(tiny_model, tmp_path):
    rows = []
    for q in QUESTIONS:
        rows.append({"prompt": q, "completion": "Ahoy, matey! Arr!", "label": True})
        rows.append({"prompt": q, "completion": "I do not know.", "label": False})
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = new_run(stage_config(tiny_model, "kto", path, steps=12))
    assert train_here(run).state is State.COMPLETED
    chosen, rejected = series(run, "rewards/chosen"), series(run, "rewards/rejected")
    assert chosen and rejected
    assert chosen[-1] > rejected[-1], (chosen, rejected)


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_stages_lower_their_loss(tiny_model, pair_file, stage):
    run = new_run(stage_config(tiny_model, stage, pair_file, steps=10))
    assert train_here(run).state is State.COMPLETED
    losses = [r.loss for r in run.metrics() if r.is_training and r.loss is not None]
    first, last = early_late(losses)
    assert last < first, losses


def test_reward_model_learns_to_rank_pairs_and_scores_replies(tiny_model, pair_file):
    run = new_run(stage_config(tiny_model, "reward", pair_file, steps=12))
    assert train_here(run).state is State.COMPLETED
    accuracy = series(run, "accuracy")
    assert accuracy and early_late(accuracy)[1] >= early_late(accuracy)[0]
    assert accuracy[-1] == 1.0, accuracy
    from studio.models import load_tokenizer
    from studio.rewards import reward_model_scorer
    from studio.config import ModelConfig
    scorer = reward_model_scorer(run.id, load_tokenizer(ModelConfig(name_or_path=str(tiny_model)), tiny_model), "cpu")
    prompt = [{"role": "user", "content": "What is fact number 99?"}]
    good, bad = scorer(prompts=[prompt, prompt], completions=["Ahoy, matey! Arr!", "I do not know."])
    assert good > bad


def test_grpo_mean_reward_rises_and_samples_are_recorded(tiny_model, prompt_file):
    # Reward replies of one word: the random tiny model rambles to its length limit, and learns to stop.
    run = new_run(stage_config(tiny_model, "grpo", prompt_file, steps=16, lr=3e-2,
                               grpo={"length_target_words": 1, "max_completion_length": 16, "num_generations": 4,
                                     "beta": 0.0}))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    rewards = series(run, "reward")
    assert len(rewards) >= 10
    first, last = early_late(rewards, 4)
    assert last > first, rewards
    assert series(run, "rewards/length/mean")
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "reply", "length"} <= set(samples[0])


def grpo_trainer(cfg):
    """The GRPO stage's trainer for `cfg`, set up as the worker sets it up, and what it was built from."""
    from studio.stages import Job, common, grpo
    from studio.training import loop
    run = new_run(cfg)
    job = Job(run, cfg, False, lambda: False)
    recipe = loop.Recipe(lambda j, tok: common.encode(j, tok, "prompts"), grpo.build,
                         row_factor=cfg.settings_of("grpo").num_generations)
    prep = loop.prepare(job, recipe)
    attempt = loop.Attempt(cfg.training.batch_size, cfg.training.grad_accum)
    return grpo.build(prep, job, loop.arguments(prep, run, attempt), []), prep


def generate(trainer, prompts, decoding, seed=0, greedy=False):
    """The trainer's own generation step on `prompts` (two replies each), with `decoding` and a fixed seed."""
    trainer.decoding = decoding
    config, kwargs = trainer.generation_config, trainer.generation_kwargs
    config.do_sample = kwargs["do_sample"] = not greedy
    torch.manual_seed(seed)
    try:
        return trainer._generate_single_turn([p for p in prompts for _ in range(2)], None, {}, 2)[0]
    finally:
        config.do_sample = kwargs["do_sample"] = True


@pytest.fixture(scope="module")
def grpo_with_dropout(tiny_model, prompt_file):
    # Dropout on the adapter and a non-zero adapter: the model is in training mode while TRL generates, so each
    # decoding step draws dropout masks as well as the sampled token.
    # float32 on a GPU too: TRL's generate and the static cache then compute the same logits to the last bits
    cfg = stage_config(tiny_model, "grpo", prompt_file, method={"dropout": 0.2},
                       grpo={"length_target_words": 3, "max_completion_length": 12, "num_generations": 4})
    cfg.training.precision = "fp32"
    trainer, prep = grpo_trainer(cfg)
    chosen = trainer.decoding  # the stage's choice (the tests below switch it)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator(p.device).manual_seed(len(name)))
    trainer.model.train()
    prompts = [prep.tokenizer(q + " Tell me more." * i)["input_ids"] for i, q in enumerate(QUESTIONS[:4])]
    return trainer, prep, prompts, chosen


def test_grpo_static_cache_decoding_writes_the_replies_trl_writes(grpo_with_dropout):
    """The studio's generation path (static cache, decoding steps through fixed buffers: what the CUDA graphs
    replay) writes exactly the replies TRL's own generate writes from the same seed, sampled with dropout or
    greedy, and leaves the trainer's generation settings and the model as they were."""
    trainer, prep, prompts, chosen = grpo_with_dropout
    assert chosen == ("graphs" if prep.device == "cuda" else "off")  # the stage's choice: graphs on GPUs
    stock = generate(trainer, prompts, "off")
    static = generate(trainer, prompts, "eager")
    assert static == stock and len(stock) == 8 and len({len(p) for p in prompts}) == 4  # left padding exercised
    assert generate(trainer, prompts, "off", seed=1) != stock  # the seed matters: these are samples
    assert generate(trainer, prompts, "eager", greedy=True) == generate(trainer, prompts, "off", greedy=True)
    stats = trainer.decode_stats
    assert stats.calls == 2 and stats.replayed > 0 and stats.captured == 0 and not stats.failures
    inner = prep.model.get_base_model()
    assert "get_compiled_call" not in inner.__dict__ and not hasattr(inner, "_previous_max_cache_length")
    assert trainer.generation_config.cache_implementation is None and trainer.generation_config.disable_compile
    assert trainer.generation_kwargs["cache_implementation"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_grpo_decoding_graphs_replay_what_the_eager_steps_compute_on_the_gpu(grpo_with_dropout):
    """On a GPU the stage generates with graphs; the replayed steps give the tokens the same steps give eagerly
    (greedy, without dropout: dropout's random masks inside a graph come from the graph's own random offsets)."""
    trainer, prep, prompts, chosen = grpo_with_dropout
    assert prep.device == "cuda" and chosen == "graphs"
    trainer.model.eval()
    try:
        graphs = generate(trainer, prompts, "graphs", greedy=True)
        assert graphs == generate(trainer, prompts, "eager", greedy=True)
    finally:
        trainer.model.train()
    sampled = generate(trainer, prompts, "graphs")  # dropout and sampling inside and between the replays
    assert len(sampled) == 8 and all(0 < len(reply) <= 12 for reply in sampled)
    stats = trainer.decode_stats
    assert stats.captured >= 2 and stats.replayed > 0 and not stats.failures, stats


def test_a_stage_started_from_a_finished_run_starts_from_its_weights(tiny_model, pair_file):
    from studio.inference import load_chat_model
    from studio.stages import Job
    from studio.training import loop
    from studio.stages import common
    sft = new_run(tiny_config(tiny_model, name="sft-first", training={"max_steps": 4, "learning_rate": 5e-2}))
    assert train_here(sft).state is State.COMPLETED
    cfg = stage_config(tiny_model, "dpo", pair_file, model={"start_from": sft.id})
    run = new_run(cfg)
    job = Job(run=run, config=cfg, resume=False, stop_requested=lambda: False)
    prep = loop.prepare(job, loop.Recipe(encode=lambda j, tok: common.encode(j, tok, "preference_pairs"),
                                         build=None))
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    tuned = load_chat_model("adapter", sft.id).model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        start = prep.model(ids).logits
        assert torch.allclose(start, tuned(ids).logits, atol=1e-4)  # the SFT run's weights, new adapter at zero
        assert not torch.allclose(start, base(ids).logits, atol=1e-3)
        with prep.model.disable_adapter():  # the reference DPO compares against: the SFT result, not the base
            assert torch.allclose(prep.model(ids).logits, start, atol=1e-5)
    assert f"run {sft.id}'s result" in run.status().message
    assert run.summary()["model"].endswith(f"from run {sft.id}")  # the run list shows where it started


def test_start_from_must_be_a_finished_run(tiny_model, pair_file):
    from studio.config import to_dict
    from studio.service import Studio
    studio = Studio()
    cfg = to_dict(stage_config(tiny_model, "dpo", pair_file, model={"start_from": "no-such-run"}))
    with pytest.raises(StudioError, match="no-such-run"):
        studio.start(cfg, visitor="local")
    running = new_run(tiny_config(tiny_model, name="unfinished"))
    cfg["model"]["start_from"] = running.id
    with pytest.raises(StudioError, match="has not finished"):
        studio.start(cfg, visitor="local")


def test_reward_code_never_runs_on_a_shared_studio(tmp_path, monkeypatch):
    from studio import rewards
    from studio.stages.grpo import GrpoSettings
    marker = tmp_path / "ran"
    code = tmp_path / "reward.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                    "def reward(prompts, completions, **_):\n    return [1.0 for _ in completions]\n")
    settings = GrpoSettings(reward_code=str(code))
    with pytest.raises(StudioError, match="shared"):
        rewards.build(settings, shared=True)
    assert not marker.exists()
    local = rewards.build(settings, shared=False)
    assert [r.name for r in local] == ["code"] and marker.exists()


@pytest.mark.parametrize("stage, data", [("dpo", "demo-dpo"), ("grpo", "demo-grpo")])
def test_demo_eval_counts_each_demos_own_measure(tiny_model, stage, data):
    from studio import demo
    extra = {"grpo": {"length_target_words": 6, "max_completion_length": 8}} if stage == "grpo" else {}
    run = new_run(tiny_config(tiny_model, name=f"tiny-{stage}", stage=stage, data={"path": data, "max_length": 64},
                              training={"max_steps": 2, "batch_size": 4, "eval_steps": 100, "save_steps": 100},
                              **extra))
    assert train_here(run).state is State.COMPLETED
    result = demo.evaluate(run.id, max_new_tokens=8, limit=3)
    assert result["prompts"] == 3 and result["stage"] == stage
    assert result["prompts"] == len(demo.heldout_prompts(data)[:3])
    if stage == "dpo":
        assert result["measure"] == "opens with 'Certainly!'"
        assert all(r["tuned_score"] == float(demo.opens_with_certainly(r["tuned"])) for r in result["rows"])
    else:
        assert result["measure"] == "mean reward"
        assert all(0 < r["base_score"] <= 1 for r in result["rows"])  # the length reward is never flat
    assert json.loads((run.path / "demo_eval.json").read_text())["tuned_total"] == result["tuned_total"]


def test_certainly_is_counted_only_at_the_start():
    from studio.demo import opens_with_certainly
    assert opens_with_certainly("Certainly! Paris.") and opens_with_certainly("  certainly, it is Paris")
    assert not opens_with_certainly("Paris, certainly.") and not opens_with_certainly("Certainlyy")


def test_the_reference_is_precomputed_only_for_runs_that_see_their_rows_again(tiny_model):
    from studio.training.fast import apply
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine
    plan = plan_speed(tiny_config(tiny_model, stage="dpo"), machine("cpu", "llama"))
    for stage in ("dpo", "kto"):
        assert apply.trainer_options(plan, "cpu", 4, 64, stage, passes=3.0)["precompute_ref_log_probs"] is True
        assert apply.trainer_options(plan, "cpu", 4, 64, stage, passes=0.7)["precompute_ref_log_probs"] is False
    assert "precompute_ref_log_probs" not in apply.trainer_options(plan, "cpu", 4, 64, "sft", passes=3.0)


def test_the_plan_graphs_grpo_decoding_on_a_gpu_but_not_under_fsdp2(tiny_model):
    from studio.training.fast.plan import plan_speed
    from tests.conftest import machine
    cfg = tiny_config(tiny_model, stage="grpo")
    assert plan_speed(cfg, machine(free_gib=60.0)).graphed_decoding
    assert not plan_speed(cfg, machine(device="cpu")).graphed_decoding
    sharded = tiny_config(tiny_model, stage="grpo", devices={"strategy": "fsdp"})
    plan = plan_speed(sharded, machine(free_gib=60.0, processes=2))
    assert not plan.graphed_decoding and any("cannot be graphed" in r for r in plan.reasons)
    assert not plan_speed(tiny_config(tiny_model), machine(free_gib=60.0)).graphed_decoding  # SFT generates nothing
