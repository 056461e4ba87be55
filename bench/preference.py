"""Preference and RL stages against stock TRL: DPO and GRPO, the studio's stages against what a user of TRL gets.

    python bench/preference.py [--shapes 1b,8b] [--arms dpo-stock,dpo-studio,grpo-stock,grpo-studio] [--seconds 12]
    python bench/preference.py --shapes 8b --arms dpo-studio --plan attention=sdpa       # A/B: padded, SDPA with the mask
    python bench/preference.py --cpu --shapes tiny --arms dpo-studio --unpad             # padding-free where the plan
                                                                                        # would not pick it (tests)
    python bench/preference.py --shapes 1b,8b --arms grpo-studio --plan liger=true       # A/B: GRPO with Liger
    python bench/preference.py --shapes 1b --arms dpo-studio --trl precompute_ref_log_probs=false
    python bench/preference.py --shapes 1b,8b --arms grpo-gen                              # generation options
    python bench/preference.py --shapes 1b --arms grpo-studio --decoding off               # A/B: TRL's own generate
    python bench/preference.py --cpu --shapes tiny --seconds 1                             # CPU smoke (tests)

Each (shape, arm) runs in its own process on the Llama-3.2-1B / Llama-3.1-8B shapes of bench.SHAPES, built from
config with random weights (bench.build_model), no downloads.

  dpo-stock    trl.DPOTrainer with peft_config LoRA (r16, alpha 32, all 7 projections), bf16, SDPA and DPOConfig's
               defaults: the reference computed in every step with the adapter switched off, each batch padded to
               its longest sequence, gradient checkpointing on (as the common web UIs do).
  dpo-studio   the studio's DPO stage: the speed plan plan_speed makes for this GPU, the model set up by
               loop.add_adapters, and studio.stages.dpo.build with loop.arguments (apply.trainer_options with
               stage="dpo").
  grpo-stock   trl.GRPOTrainer likewise (GRPOConfig's defaults, checkpointing on), a length reward.
  grpo-studio  studio.stages.grpo.build on the studio's set-up, with the studio's own length reward.
  grpo-gen     not a comparison: the studio GRPO trainer's generation step timed under each option (--gen-options):
               TRL's generate (dynamic cache), TRL's static cache, the studio's decoding steps as CUDA graphs
               (generation.py), and with the graphs: four times the completions at once, the adapter merged, PEFT's
               LoRA forward; transformers' own torch.compile only when asked (its compilation did not fit an arm's
               time). Then the greedy replies with the graphs against TRL's generate. With --plan liger=true,
               generation with Liger's kernels.

Both sides of a comparison get the same algorithm settings (DPO: sigmoid loss, beta 0.1, batch of 8 pairs,
max_length 1024; GRPO: beta 0.04, 8 generations of up to 256 tokens per prompt, 16 completions per step); only
how they are computed differs.

Data (seed 0): preference pairs of random tokens, a prompt of ~256 tokens and a chosen and a rejected reply of
~256 each (log-normal, sigma 0.5, clipped to [32, 512] and [16, 480], so no pair exceeds max_length), written as the
words of a word-level tokenizer over the whole vocabulary, so the trainers tokenise them themselves; GRPO: a fixed
set of 64 prompts drawn the same way. Random weights rarely write the end token, so GRPO replies run to 256 tokens.

Same computation: before timing, the LoRA weights of every arm are set to the same non-zero values (drawn from
the parameter's name) and each DPO arm computes the DPO loss, reward margin and policy log-probabilities of its
first 8 pairs; each GRPO arm the mean per-token log-probability of a fixed batch of prompts and replies and its
KL from the reference (adapter off), and the greedy replies its generation step writes to 4 prompts (32 tokens). The
adapters are then put back to their start. The report gives the relative difference of each studio arm's figures to
the stock arm's of the same shape, and the share of greedy tokens that are the stock arm's before the first that is
not (in bf16 random weights give near-ties, so a different kernel alone can flip a token).

Reported: DPO pairs/s and real (non-padding) tokens/s, and for arms that precompute the reference, pairs/s
over one epoch and over three with the precomputation counted (not TRL's hash of the model that comes with it:
`build_s`, the trainer's set-up, has it); GRPO completions/s, completion tokens/s, real
tokens/s and the share of the step spent generating; the median step, peak GPU memory, and the ratio to the
stock arm of the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import LORA_ALPHA, LORA_R, PROJECTIONS, SHAPES, child_result, parse_changes, versions

RESULTS = ROOT / "bench" / "results"
# A shape small enough for the CPU smoke test; the measured shapes are bench.SHAPES'.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "head_dim": 16}
DPO_BATCH = 8  # pairs per step (TrainingArguments' default batch)
DPO_PAIRS = {"1b": 1024, "8b": 256, "tiny": 16}  # the data set: enough for warm-up and the timed steps
DPO_MAX_LENGTH = 1024
BETA_DPO = 0.1
GRPO_BATCH, GENERATIONS, COMPLETION_TOKENS, BETA_GRPO, GRPO_PROMPTS = 16, 8, 256, 0.04, 64
TINY_COMPLETION_TOKENS = 8
LENGTH_TARGET_WORDS = 100
ARMS = ("dpo-stock", "dpo-studio", "grpo-stock", "grpo-studio", "grpo-gen")
# grpo-gen's options (--gen-options): the default leaves out torch.compile, whose compilation takes minutes
GEN_OPTIONS = "dynamic,static,graphs,graphs4x,merged,peft"


def shape_config(shape: str) -> dict:
    return TINY if shape == "tiny" else SHAPES[shape]


def completion_tokens(shape: str) -> int:
    return TINY_COMPLETION_TOKENS if shape == "tiny" else COMPLETION_TOKENS


# ----------------------------------------------------------------------------------------------- data
def word(token_id: int) -> str:
    return f"t{token_id}"


def tokenizer(vocab: int):
    """A word-level tokenizer whose words are the vocabulary's ids: the trainers tokenise text, and random
    token ids written as its words come back as exactly those ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word(i): i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _lengths(rng, n: int, median: float, low: int, high: int):
    import numpy as np
    return np.clip(np.exp(rng.normal(math.log(median), 0.5, n)), low, high).astype(int)


def _text(rng, n: int, vocab: int) -> str:
    return " ".join(word(int(i)) for i in rng.integers(10, vocab, n))


def make_pairs(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    """Preference pairs as text: the replies start with a space (TRL joins prompt and reply as strings) and end
    with the end token (which TRL would otherwise append, to non-conversational replies)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    prompts = _lengths(rng, n, 256 * scale, max(2, int(32 * scale)), int(512 * scale))
    chosen = _lengths(rng, n, 256 * scale, max(2, int(16 * scale)), int(480 * scale))
    rejected = _lengths(rng, n, 256 * scale, max(2, int(16 * scale)), int(480 * scale))
    return [{"prompt": _text(rng, int(p), vocab), "chosen": " " + _text(rng, int(c), vocab) + " <eos>",
             "rejected": " " + _text(rng, int(r), vocab) + " <eos>"} for p, c, r in zip(prompts, chosen, rejected)]


def make_prompts(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> list[dict]:
    import numpy as np
    rng = np.random.default_rng(seed + 1)
    return [{"prompt": _text(rng, int(p), vocab)}
            for p in _lengths(rng, n, 256 * scale, max(2, int(32 * scale)), int(512 * scale))]


# ---------------------------------------------------------------------------------------------- model
def build_model(shape: str, device: str):
    """bench.build_model for the GPU shapes (the same random weights the training bench uses)."""
    import torch
    if device == "cuda":
        from bench.bench import build_model as bench_build
        return bench_build(shape)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shape_config(shape), attn_implementation="sdpa"))


def cache() -> Path:
    return Path(os.environ.get("BENCH_CACHE", "/tmp/studio-bench"))


def model_folder(shape: str) -> Path:
    """The model's config on disk: what the studio's planner reads (no weights)."""
    folder = cache() / f"{shape}-config"
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig
        LlamaConfig(**shape_config(shape)).save_pretrained(folder)
    return folder


def lora_config():
    from peft import LoraConfig
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PROJECTIONS,
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------- timing
class StepTimer:
    """A Trainer callback: synchronises the GPU after `warmup` optimizer steps, then times whole steps until
    `seconds` have passed and at least `min_steps` were timed. `counters` are read at both ends (cumulative
    real tokens, say) and reported as differences."""

    def __init__(self, seconds: float, warmup: int, min_steps: int = 1, counters: dict | None = None):
        import torch
        from transformers import TrainerCallback
        self.seconds, self.warmup, self.min_steps = seconds, warmup, min_steps
        self.counters = counters or {}
        self.start = self.last = None
        self.active = False
        self.step_s: list[float] = []
        self.result: dict = {}
        cuda = torch.cuda.is_available()
        timer = self

        def sync():
            if cuda:
                torch.cuda.synchronize()

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == timer.warmup:
                    sync()
                    timer.start = timer.last = time.perf_counter()
                    timer.begin = {k: f() for k, f in timer.counters.items()}
                    timer.active = True
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                elif timer.start is not None:
                    now = time.perf_counter()
                    timer.step_s.append(now - timer.last)
                    timer.last = now
                    if now - timer.start >= timer.seconds and len(timer.step_s) >= timer.min_steps:
                        sync()
                        timer.active = False
                        steps = sorted(timer.step_s)
                        timer.result = {"seconds": time.perf_counter() - timer.start, "steps": len(steps),
                                        "step_s_median": steps[len(steps) // 2], "step_s_min": steps[0],
                                        "step_s_max": steps[-1],
                                        **{k: f() - timer.begin[k] for k, f in timer.counters.items()}}
                        control.should_training_stop = True
                return control
        self.callback = Callback()


# ------------------------------------------------------------------------------------- same computation
def _lora_params(model):
    return [(name, p) for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def set_lora(model) -> dict:
    """Give every LoRA matrix the same non-zero values in every arm (drawn from the parameter's name, so the set-up
    path does not matter); returns the values they had, for `restore_lora`. With B = 0, as adapters start, the
    policy is the reference and the DPO loss is log 2 whatever the code computes."""
    import torch
    saved = {}
    with torch.no_grad():
        for name, p in _lora_params(model):
            saved[name] = p.detach().clone()
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            scale = p.shape[1] ** -0.5 if ".lora_A." in name else 0.005
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return saved


def restore_lora(model, saved: dict) -> None:
    import torch
    with torch.no_grad():
        for name, p in _lora_params(model):
            p.copy_(saved[name])


def _autocast(device: str, dtype):
    import contextlib

    import torch
    return torch.autocast(device, dtype=dtype) if dtype == torch.bfloat16 else contextlib.nullcontext()


def with_trainer_kernels(trainer) -> None:
    """Apply now what the Trainer applies when training starts (Liger's kernels), so that the checks before
    timing compute what the timed steps compute. Applying them again at the start is harmless."""
    if trainer.args.use_liger_kernel:
        try:
            from transformers.integrations.liger import apply_liger_kernel
        except ImportError:  # a transformers that applies them inline: the checks then run without them
            return
        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)


def dpo_check(trainer, device: str, dtype) -> dict:
    """The DPO loss, reward margin and policy log-probabilities of the first DPO_BATCH pairs (the trainer's
    prepared rows, through its collator and its compute_loss), with the LoRA weights of `set_lora`."""
    import torch
    model = trainer.model
    was_training = model.training
    model.train()
    saved = set_lora(model)
    try:
        rows = [trainer.train_dataset[i] for i in range(DPO_BATCH)]
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in trainer.data_collator(rows).items()}
        with torch.no_grad(), _autocast(device, dtype):
            loss = float(trainer.compute_loss(model, batch))
        metrics = trainer._metrics["train"]
        out = {"loss": loss, "margin": metrics["rewards/margins"][-1], "chosen_logps": metrics["logps/chosen"][-1],
               "rejected_logps": metrics["logps/rejected"][-1]}
    finally:
        restore_lora(model, saved)
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        model.train(was_training)
    return out


def grpo_check(trainer, prompt_ids: list[list[int]], replies: list[list[int]], device: str, dtype) -> dict:
    """Mean per-token log-probability of fixed replies to fixed prompts, and its KL from the reference (the
    adapter off), through the trainer's own log-probability code: what the GRPO loss is made of."""
    import torch
    model = trainer.model
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[0] * (width - len(p)) + p + r for p, r in zip(prompt_ids, replies)], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(r)) for p, r in zip(prompt_ids, replies)],
                        device=device)
    keep = len(replies[0])
    saved = set_lora(model)
    try:
        with torch.no_grad(), _autocast(device, dtype):
            logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
            with model.disable_adapter():
                ref, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        out = {"logp_mean": float(logps.float().mean()), "kl_mean": float(kl.float().mean())}
    finally:
        restore_lora(model, saved)
    return out


GREEDY_TOKENS = 32


def grpo_greedy(trainer, prompt_ids: list[list[int]], device: str, tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """The replies the trainer's own generation step writes to fixed prompts with greedy decoding (no sampling),
    with the LoRA weights of `set_lora` and the model in eval mode: what its generation computes, comparable
    token by token across arms (`prefix_agreement`)."""
    model = trainer.model
    config, kwargs = trainer.generation_config, trainer.generation_kwargs
    saved = (config.do_sample, config.max_new_tokens, dict(kwargs), model.training)
    config.do_sample, config.max_new_tokens = False, tokens
    kwargs.update(do_sample=False, max_new_tokens=tokens)
    lora = set_lora(model)
    model.eval()
    try:
        return [list(map(int, c)) for c in trainer._generate_single_turn(prompt_ids, None, {}, 1)[0]]
    finally:
        restore_lora(model, lora)
        config.do_sample, config.max_new_tokens = saved[0], saved[1]
        kwargs.clear()
        kwargs.update(saved[2])
        model.train(saved[3])


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of tokens the two sets of replies have in common before their first difference, row by row."""
    def common(x, y):
        n = 0
        for i, j in zip(x, y):
            if i != j:
                break
            n += 1
        return n
    return sum(common(x, y) for x, y in zip(a, b)) / max(1, sum(max(len(x), len(y)) for x, y in zip(a, b)))


# ------------------------------------------------------------------------------------------------ arms
def studio_setup(shape: str, stage: str, device: str, settings: dict, batch: int, max_length: int,
                 plan_changes: dict, machine_changes: dict, unpad: bool = False):
    """The studio's path up to its trainer's arguments: config, speed plan, model, adapters, Prepared, run."""
    import torch

    from studio.config import from_dict
    from studio.rendering import EncodedSet
    from studio.runs import new_run
    from studio.training import loop
    from studio.training.fast import apply
    from studio.training.fast.plan import plan_speed
    from studio.training.fast.probe import probe
    os.environ.setdefault("STUDIO_HOME", str(cache() / "home"))
    location = model_folder(shape)
    cfg = from_dict({"name": f"bench-{shape}-{stage}", "stage": stage, "model": {"name_or_path": str(location)},
                     "data": {"max_length": max_length},
                     "method": {"method": "lora", "rank": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                "target_modules": PROJECTIONS},
                     "training": {"batch_size": batch, "learning_rate": 1e-5, "max_steps": 100000, "seed": 0,
                                  "save_steps": 1000000, "eval_steps": 1000000, "logging_steps": 100000,
                                  "precision": "bf16" if device == "cuda" else "fp32"},
                     stage: settings})
    if unpad:
        plan_changes = {**plan_changes, "attention": "packed_varlen"}
    machine = replace(probe(cfg, str(location), device), **machine_changes)
    plan = plan_speed(cfg, machine).changed(**plan_changes)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    apply.before_model_load(plan, device)
    model = build_model(shape, device)
    model.set_attn_implementation(plan.attention)
    model = loop.add_adapters(model, cfg, None, plan, dtype)  # the DPO stage's build makes it padding-free
    return cfg, plan, model, dtype, loop, apply, EncodedSet, new_run


def run_dpo(shape: str, studio: bool, device: str, seconds: float, changes: dict) -> dict:
    import datasets
    import torch
    from trl import DPOTrainer
    datasets.disable_progress_bars()
    vocab = shape_config(shape)["vocab_size"]
    tok = tokenizer(vocab)
    scale = 1.0 if shape != "tiny" else 0.05
    rows = make_pairs(DPO_PAIRS[shape], vocab, scale=scale)
    timer = StepTimer(seconds, warmup=5 if device == "cuda" else 1, min_steps=3 if device == "cuda" else 1)
    precompute = {"seconds": 0.0}
    if studio:
        from studio.records import Attempt
        from studio.stages import Job, dpo
        cfg, plan, model, dtype, loop, apply, EncodedSet, new_run = studio_setup(
            shape, "dpo", device, {"beta": BETA_DPO, "loss": "sigmoid"}, DPO_BATCH, DPO_MAX_LENGTH,
            changes.get("plan", {}), changes.get("machine", {}), unpad=changes.get("unpad", False))
        prep = loop.Prepared(cfg, tok, model, EncodedSet(rows=rows), EncodedSet(), device, dtype, plan)
        run = new_run(cfg)
        arguments = {**loop.arguments(prep, run, Attempt(DPO_BATCH, 1)), **changes.get("trl", {})}
        original = DPOTrainer._precompute_ref_logps

        def timed_precompute(self, *args, **kwargs):  # measured: it runs once, before training
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                precompute["seconds"] += time.perf_counter() - started
        DPOTrainer._precompute_ref_logps = timed_precompute
        started = time.perf_counter()
        trainer = dpo.build(prep, Job(run, cfg, False, lambda: False), arguments,
                            [timer.callback, *apply.trainer_callbacks(plan)])
        build_s = time.perf_counter() - started
        DPOTrainer._precompute_ref_logps = original
        precomputed = bool(trainer.args.precompute_ref_log_probs)
        settings = plan.summary() + (", reference log-probs precomputed" if precomputed else ", reference every step")
        if apply.padding_free(plan, "dpo"):
            settings += ", padding-free"
        plan_dict = plan.as_dict()
    else:
        from trl import DPOConfig
        model = build_model(shape, device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        args = DPOConfig(output_dir=str(cache() / "out-dpo"), per_device_train_batch_size=DPO_BATCH,
                         max_steps=100000, learning_rate=1e-5, bf16=device == "cuda", use_cpu=device == "cpu",
                         logging_steps=1000000, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                         beta=BETA_DPO, loss_type=["sigmoid"], max_length=DPO_MAX_LENGTH)
        started = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora_config(), callbacks=[timer.callback])
        build_s = time.perf_counter() - started
        model = trainer.model
        precomputed = False
        settings = "DPOConfig defaults: reference every step, padded to the longest, checkpointing, SDPA"
        plan_dict = None
    timer.counters["tokens"] = lambda: trainer._total_train_tokens
    with_trainer_kernels(trainer)
    check = dpo_check(trainer, device, dtype)
    trainer.train()
    r = timer.result
    pairs_s = r["steps"] * DPO_BATCH / r["seconds"]
    out = {**r, "settings": settings, "plan": plan_dict, "check": check, "pairs_per_s": pairs_s,
           "tokens_per_s": r["tokens"] / r["seconds"], "precompute_s": precompute["seconds"],
           "precomputed": precomputed, "dataset_pairs": len(rows), "build_s": build_s}
    if precomputed:  # what a run of one or three epochs over the data set gets, the precomputation counted
        per_pair = precompute["seconds"] / len(rows)
        out["pairs_per_s_1_epoch"] = 1 / (1 / pairs_s + per_pair)
        out["pairs_per_s_3_epochs"] = 1 / (1 / pairs_s + per_pair / 3)
    return out


def length_reward(completions, **kwargs):
    """Stock arm's reward: close to LENGTH_TARGET_WORDS words (the studio arm uses its own length reward)."""
    return [-abs(len(str(c).split()) - LENGTH_TARGET_WORDS) / LENGTH_TARGET_WORDS for c in completions]


def _grpo_trainer(shape: str, studio: bool, device: str, timer: StepTimer, changes: dict):
    import datasets
    import torch
    datasets.disable_progress_bars()
    vocab = shape_config(shape)["vocab_size"]
    tok = tokenizer(vocab)
    scale = 1.0 if shape != "tiny" else 0.05
    rows = make_prompts(GRPO_PROMPTS if shape != "tiny" else 8, vocab, scale=scale)
    callbacks = [timer.callback] if timer else []
    if studio:
        from studio.records import Attempt
        from studio.stages import Job, grpo
        cfg, plan, model, dtype, loop, apply, EncodedSet, new_run = studio_setup(
            shape, "grpo", device, {"num_generations": GENERATIONS, "max_completion_length": completion_tokens(shape),
                                    "temperature": 1.0, "beta": BETA_GRPO, "length_target_words": LENGTH_TARGET_WORDS},
            GRPO_BATCH, int(512 * scale), changes.get("plan", {}), changes.get("machine", {}))
        prep = loop.Prepared(cfg, tok, model, EncodedSet(rows=rows), EncodedSet(), device, dtype, plan,
                             row_factor=GENERATIONS)
        run = new_run(cfg)
        arguments = {**loop.arguments(prep, run, Attempt(GRPO_BATCH, 1)), **changes.get("trl", {})}
        trainer = grpo.build(prep, Job(run, cfg, False, lambda: False), arguments,
                             [*callbacks, *apply.trainer_callbacks(plan)])
        if changes.get("decoding"):  # A/B: the generation path (grpo.trainer_class)
            trainer.decoding = changes["decoding"]
        extra = [f"{k}={v}" for k, v in changes.get("trl", {}).items()]
        settings = plan.summary() + f", decoding: {trainer.decoding}" + (f" [{', '.join(extra)}]" if extra else "")
        plan_dict = plan.as_dict()
    else:
        from trl import GRPOConfig, GRPOTrainer
        model = build_model(shape, device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        args = GRPOConfig(output_dir=str(cache() / "out-grpo"), per_device_train_batch_size=GRPO_BATCH,
                          num_generations=GENERATIONS, max_completion_length=completion_tokens(shape), beta=BETA_GRPO,
                          temperature=1.0, max_steps=100000, learning_rate=1e-5, bf16=device == "cuda",
                          use_cpu=device == "cpu", logging_steps=1000000, save_strategy="no", report_to="none",
                          disable_tqdm=True, seed=0)
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                              peft_config=lora_config(), callbacks=callbacks)
        settings = "GRPOConfig defaults: transformers generate, checkpointing, SDPA"
        plan_dict = None
    return trainer, tok, rows, dtype, settings, plan_dict


def _check_batch(tok, rows, shape: str):
    import numpy as np
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:4]]
    rng = np.random.default_rng(7)
    replies = [rng.integers(10, shape_config(shape)["vocab_size"], 64 if shape != "tiny" else 6).tolist()
               for _ in prompts]
    return prompts, replies


def run_grpo(shape: str, studio: bool, device: str, seconds: float, changes: dict) -> dict:
    import torch
    gen = {"seconds": 0.0, "completion_tokens": 0, "completions": 0}
    timer = StepTimer(seconds, warmup=1, min_steps=2 if device == "cuda" else 1,
                      counters={"completion_tokens": lambda: gen["completion_tokens"],
                                "completions": lambda: gen["completions"], "generation_s": lambda: gen["seconds"]})
    trainer, tok, rows, dtype, settings, plan_dict = _grpo_trainer(shape, studio, device, timer, changes)
    timer.counters["tokens"] = lambda: trainer.state.num_input_tokens_seen
    original = trainer._generate_single_turn

    def timed_generation(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        gen["seconds"] += time.perf_counter() - started
        gen["completion_tokens"] += sum(len(c) for c in out[0])
        gen["completions"] += len(out[0])
        return out
    trainer._generate_single_turn = timed_generation
    with_trainer_kernels(trainer)
    prompts, replies = _check_batch(tok, rows, shape)
    check = grpo_check(trainer, prompts, replies, device, dtype)
    greedy = grpo_greedy(trainer, prompts, device, GREEDY_TOKENS if shape != "tiny" else 6)
    trainer.train()
    r = timer.result
    stats = getattr(trainer, "decode_stats", None)
    return {**r, "settings": settings, "plan": plan_dict, "check": check, "greedy": greedy,
            "decoding": getattr(trainer, "decoding", "off"), "decode_stats": stats.as_dict() if stats else None,
            "completions_per_s": r["completions"] / r["seconds"],
            "completion_tokens_per_s": r["completion_tokens"] / r["seconds"],
            "tokens_per_s": r["tokens"] / r["seconds"], "generation_share": r["generation_s"] / r["seconds"]}


def run_grpo_generation(shape: str, device: str, changes: dict, repeats: int = 1) -> dict:
    """The studio GRPO trainer's generation step (16 completions) under each option, timed `repeats` times
    after one untimed call each, as in training (no autocast; the model in training mode, LoRA dropout 0); then
    greedy replies with the graphs against TRL's generate."""
    import torch
    trainer, tok, rows, dtype, settings, plan_dict = _grpo_trainer(shape, True, device, None, changes)
    with_trainer_kernels(trainer)  # generation as in training, where the Trainer has applied them
    model = trainer.model
    model.train()
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:GRPO_BATCH // GENERATIONS]]
    prompt_ids = [ids for ids in prompts for _ in range(GENERATIONS)]  # each prompt's group, as TRL's sampler has it

    def generate(ids=prompt_ids):
        return trainer._generate_single_turn(ids, None, {}, GENERATIONS)

    def timed(ids=prompt_ids) -> dict:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        generate(ids)  # untimed: warm-up (and, for torch.compile, the compilation)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - started
        times, tokens = [], 0
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            completions = generate(ids)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            tokens += sum(len(c) for c in completions)
        seconds = sorted(times)[len(times) // 2]
        return {"seconds": seconds, "completions": len(ids), "completion_tokens_per_s": tokens / sum(times),
                "first_call_s": first}

    def option(name: str, before, after=None, ids=prompt_ids, autocast=False, key=""):
        if key not in chosen:
            return
        try:
            before()
            with _autocast(device, dtype) if autocast else contextlib.nullcontext():
                results[name] = timed(ids)
        except Exception as err:  # noqa: BLE001 - an option that fails is reported, the others still run
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            if after:
                after()
        print(f"GEN {name}: {results[name]}", flush=True)

    def set_cache(value):
        trainer.generation_config.cache_implementation = value
        trainer.generation_kwargs["cache_implementation"] = value

    def decoding(mode: str):
        trainer.decoding = mode

    fused = {}

    def unfuse():  # the fused LoRA path is an instance attribute; without it PEFT's own forward runs
        for module in model.modules():
            if hasattr(module, "lora_A") and "forward" in module.__dict__:
                fused[module] = module.__dict__.pop("forward")

    def refuse():
        for module, forward in fused.items():
            module.forward = forward

    merged = {}

    def merge():  # the adapter added into the base weights, which are kept aside and put back exactly
        for name, p in model.named_parameters():
            if "base_layer.weight" in name:
                merged[name] = p.detach().clone()
        model.merge_adapter()

    def unmerge():
        model.unmerge_adapter()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in merged:
                    p.copy_(merged.pop(name))

    def compiled(on: bool):  # transformers' own auto-compile of the decoding forward, which TRL turns off
        set_cache("static" if on else None)
        trainer.generation_config.disable_compile = not on

    results: dict = {}
    chosen = set((changes.get("gen_options") or GEN_OPTIONS).split(","))
    # Continuous batching had not finished one call in 100 s on the H200 (bench/NOTES.md, session 8): left out.
    option("TRL's generate (dynamic cache, eager)", lambda: decoding("off"), key="dynamic")
    option("static cache, eager (TRL's cache_implementation=static)", lambda: set_cache("static"),
           lambda: set_cache(None), key="static")
    option("static cache, decoding steps as CUDA graphs (studio)", lambda: decoding("graphs"), key="graphs")
    option("graphs, 4x completions at once", lambda: decoding("graphs"), ids=prompt_ids * 4, key="graphs4x")
    option("graphs, adapter merged", lambda: (decoding("graphs"), merge()), unmerge, key="merged")
    # PEFT's forward keeps the adapter in float32 and (with the plan) no longer casts its input: it runs under autocast
    option("graphs, PEFT's LoRA forward (fused LoRA off, autocast)", lambda: (decoding("graphs"), unfuse()), refuse,
           autocast=True, key="peft")
    # Greedy replies, graphs against TRL's generate: the same tokens up to the first near-tie that bf16 flips
    greedy = {}
    for mode in ("off", "graphs"):
        decoding(mode)
        greedy[mode] = grpo_greedy(trainer, _check_batch(tok, rows, shape)[0], device,
                                   GREEDY_TOKENS if shape != "tiny" else 6)
    name = "greedy replies, graphs against TRL's generate"
    results[name] = {"agreement": prefix_agreement(greedy["graphs"], greedy["off"])}
    print(f"GEN {name}: {results[name]}", flush=True)
    # Last: its compilation may not end within the arm's time
    option("static cache + torch.compile (transformers' auto-compile, reduce-overhead)",
           lambda: (decoding("off"), compiled(True)), lambda: compiled(False), key="compile")
    stats = getattr(trainer, "decode_stats", None)
    return {"settings": settings, "plan": plan_dict, "generation": results,
            "decode_stats": stats.as_dict() if stats else None}


def child(shape: str, arm: str, seconds: float, device: str, changes: dict) -> dict:
    import torch
    if device == "cpu":  # the tiny shape's ops are too small to share out: a second thread only adds waiting
        torch.set_num_threads(1)
    if arm.startswith("dpo-"):
        result = run_dpo(shape, arm == "dpo-studio", device, seconds, changes)
    elif arm == "grpo-gen":
        result = run_grpo_generation(shape, device, changes)
    else:
        result = run_grpo(shape, arm == "grpo-studio", device, seconds, changes)
    if device == "cuda":
        result.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                      reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    return {**result, "shape": shape, "arm": arm}


# ------------------------------------------------------------------------------------------------ main
def run_child(shape: str, arm: str, seconds: float, device: str, out: Path, changes: dict,
              timeout: float | None = None) -> dict:
    command = [sys.executable, __file__, "--child", shape, arm, "--seconds", str(seconds), "--device", device,
               "--changes", json.dumps(changes)]
    return child_result(command, shape, arm, out, f"pref-{shape}-{arm}.log", timeout)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(rows: list[dict]) -> None:
    """Each studio row's speed ratio and check differences against the stock row of its shape and stage."""
    stock = {(r["shape"], r["arm"].split("-")[0]): r for r in rows if r["arm"].endswith("-stock") and "error" not in r}
    for r in rows:
        base = stock.get((r["shape"], r["arm"].split("-")[0]))
        if "error" in r or base is None or r is base or r["arm"] == "grpo-gen":
            continue
        if r["arm"].startswith("dpo"):
            r["vs_stock"] = r["pairs_per_s"] / base["pairs_per_s"]
            if "pairs_per_s_1_epoch" in r:
                r["vs_stock_1_epoch"] = r["pairs_per_s_1_epoch"] / base["pairs_per_s"]
                r["vs_stock_3_epochs"] = r["pairs_per_s_3_epochs"] / base["pairs_per_s"]
        else:
            r["vs_stock"] = r["completions_per_s"] / base["completions_per_s"]
            if r.get("greedy") and base.get("greedy"):
                r["greedy_vs_stock"] = prefix_agreement(r["greedy"], base["greedy"])
        r["check_vs_stock"] = {k: relative(v, base["check"][k]) for k, v in r["check"].items()}


def dpo_table(rows: list[dict]) -> str:
    lines = [("| shape | arm | settings | pairs/s | real tokens/s | step s (median) | peak GiB | vs stock | "
              "precompute s | 1 epoch / 3 epochs vs stock | loss (rel. diff to stock) | margin rel. diff | "
              "log-probs rel. diff |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["arm"].startswith("dpo"):
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['arm']} | failed: {r['error'][:160]} |" + " |" * 10)
            continue
        diff = r.get("check_vs_stock")
        epochs = (f"{r['vs_stock_1_epoch']:.2f}x / {r['vs_stock_3_epochs']:.2f}x" if "vs_stock_1_epoch" in r else "-")
        logps = max(diff["chosen_logps"], diff["rejected_logps"]) if diff else 0.0
        check = f"{r['check']['loss']:.4f}" + (f" ({diff['loss']:.1e}) | {diff['margin']:.1e} | {logps:.1e}" if diff
                                               else " | - | -")
        lines.append(
            f"| {r['shape']} | {r['arm']} | {r['settings']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_s_median']:.3f} | {r.get('peak_gib', 0):.1f} | {r.get('vs_stock', 1.0):.2f}x | "
            f"{r['precompute_s']:.1f} | {epochs} | {check} |")
    return "\n".join(lines)


def grpo_table(rows: list[dict]) -> str:
    lines = [("| shape | arm | settings | completions/s | completion tokens/s | real tokens/s | step s (median) | "
              "generating | peak GiB | vs stock | log-prob / KL rel. diff to stock | greedy tokens as stock's |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["arm"].startswith("grpo") or r["arm"] == "grpo-gen":
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['arm']} | failed: {r['error'][:160]} |" + " |" * 9)
            continue
        diff = r.get("check_vs_stock")
        greedy = f" {100 * r['greedy_vs_stock']:.0f}% |" if "greedy_vs_stock" in r else " - |"
        lines.append(
            f"| {r['shape']} | {r['arm']} | {r['settings']} | {r['completions_per_s']:.2f} | "
            f"{r['completion_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['step_s_median']:.2f} | "
            f"{100 * r['generation_share']:.0f}% | {r.get('peak_gib', 0):.1f} | {r.get('vs_stock', 1.0):.2f}x | "
            + (f"{diff['logp_mean']:.1e} / {diff['kl_mean']:.1e} |" if diff else "- |") + greedy)
    return "\n".join(lines)


def generation_table(rows: list[dict]) -> str:
    lines = [("| shape | generation option (studio GRPO trainer) | s per call (median) | completions | "
              "completion tokens/s | first call s |"), "|---|---|---|---|---|---|"]
    for r in rows:
        if r["arm"] != "grpo-gen":
            continue
        if "error" in r:
            lines.append(f"| {r['shape']} | failed: {r['error'][:160]} | | | | |")
            continue
        for name, g in r["generation"].items():
            if "agreement" in g:
                lines.append(f"| {r['shape']} | {name} | {100 * g['agreement']:.0f}% of tokens | | | |")
            elif "error" in g:
                lines.append(f"| {r['shape']} | {name} | failed: {g['error'][:160]} | | | |")
            else:
                first = f"{g['first_call_s']:.1f}" if "first_call_s" in g else "-"
                lines.append(f"| {r['shape']} | {name} | {g['seconds']:.2f} | {g['completions']} | "
                             f"{g['completion_tokens_per_s']:,.0f} | {first} |")
    return "\n".join(lines)


def report(rows: list[dict], meta: dict) -> str:
    parts = [f"{meta['device']}; {meta['versions']}; changes {meta['changes']}"]
    if any(r["arm"].startswith("dpo") for r in rows):
        parts.append("DPO (8 pairs a step, sigmoid loss, beta 0.1)\n\n" + dpo_table(rows))
    if any(r["arm"] in ("grpo-stock", "grpo-studio") for r in rows):
        parts.append("GRPO (16 completions a step: 2 prompts x 8, up to 256 tokens, beta 0.04)\n\n" + grpo_table(rows))
    if any(r["arm"] == "grpo-gen" for r in rows):
        parts.append("GRPO generation options\n\n" + generation_table(rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--arms", default="dpo-stock,dpo-studio,grpo-stock,grpo-studio")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (the tiny shape: a smoke test, not a measure)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                   help="A/B: change a field of the studio arms' speed plan (as in bench.py)")
    p.add_argument("--machine", action="append", default=[], metavar="FIELD=VALUE",
                   help="A/B: plan as if the machine were otherwise (as in bench.py)")
    p.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE",
                   help="A/B: set a TRL config argument of the studio arms, e.g. precompute_ref_log_probs=false")
    p.add_argument("--decoding", choices=("off", "eager", "graphs"), default=None,
                   help="A/B: the studio GRPO arm's generation path (default: the stage's choice; graphs on a GPU)")
    p.add_argument("--gen-options", default=None, help=f"grpo-gen's options, of {GEN_OPTIONS},compile")
    p.add_argument("--unpad", action="store_true", help="plan the variable-length attention, so DPO runs padding-free, where the plan would not (the CPU "
                        "tests, with a stand-in kernel)")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds an arm may take before it is killed")
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "ARM"))
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--changes", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = child(*args.child, args.seconds, args.device, json.loads(args.changes))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    device = "cpu" if args.cpu else "cuda"
    changes = {"plan": parse_changes(args.plan), "machine": parse_changes(args.machine),
               "trl": parse_changes(args.trl), "unpad": args.unpad, "decoding": args.decoding,
               "gen_options": args.gen_options}
    import torch
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    rows = []
    for shape in args.shapes.split(","):
        for arm in args.arms.split(","):
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")
            row = run_child(shape, arm, args.seconds, device, Path(args.out), changes, args.child_timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    compare(rows)
    meta = {"device": name, "versions": versions(), "seconds": args.seconds, "changes": changes,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M") + (f"-{args.tag}" if args.tag else "")
    prefix = "cpu-pref" if device == "cpu" else "gpu-pref"
    (out / f"{prefix}-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = report(rows, meta)
    (out / f"{prefix}-{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
