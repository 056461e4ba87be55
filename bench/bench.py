"""Training-speed benchmark: the studio's own training path against what a user of the stock tools gets.

GPU mode (default), on a CUDA machine, no downloads:
    python bench/bench.py [--shapes 1b,8b] [--arms stock,studio,studio-qlora,studio-full] [--seconds 30]
                          [--repeat N]
Each (shape, arm) runs in its own process on Llama-3.2-1B / Llama-3.1-8B shapes built from config with
random weights, over the same documents (log-normal lengths, median 384, clipped to [32, 2048], seed 0).

  stock         Trainer + PEFT LoRA (r16, alpha 32, all 7 projections), bf16, SDPA, batches padded to the
                longest row, gradient checkpointing on: what the common web UIs do by default.
  studio        studio.training: prepare-style model set-up, the speed plan it picks for this GPU, and its
                TRL trainer, with LoRA bf16 (same LoRA settings).
  studio-qlora  the same with the base in 4-bit NF4 (double quantisation).
  studio-full   full fine-tuning (1B shape only).

With --repeat N every arm runs N times, the arms taking turns, and the table reports the median run with the
range: host-bound arms (QLoRA) vary by more than 10% from one run to the next on the same machine.

A/B runs change the studio arms' speed plan, a plain object, not the code: --plan FIELD=VALUE sets a field of
the plan the studio made (e.g. --plan attention=flex_attention --plan fused_lora=false), --machine FIELD=VALUE
a fact it is made from (e.g. --machine liger_installed=false). Both are recorded with the results.

Before timing, each studio arm checks that its training loss on 8 documents matches a plain per-document
forward pass (relative difference <= 1e-2). Reported per arm: real (non-padding) tokens/s, MFU, peak
GPU memory, ratio to the stock arm of the same shape.

FLOPs per document of length L (performance.md): LoRA L*(4*N_mm + 6*N_lora) + 6*n_layers*d_attn*L^2;
full 6*N_mm*L + 6*n_layers*d_attn*L^2. N_mm counts every matmul weight including the LM head (which is
a matmul over the whole vocabulary for every position), not the embedding lookup. Recomputation from
checkpointing is not counted. MFU = FLOPs / (seconds * 989.4e12), and also against the measured bf16
matmul peak of the card.

Several GPUs: --gpus N runs each studio arm twice, on one GPU and on N under torchrun (the launcher's own
path: studio/distributed.py), with --strategy auto|ddp|fsdp (auto: the studio's choice, recorded). Tokens/s
are every GPU's together, MFU is per GPU, peak memory is the first GPU's, and the scaling efficiency is
tokens/s on N GPUs / (N x tokens/s on one). NCCL's NVLink multicast stays off in every process.

CPU mode: python bench/bench.py --cpu   (the bundled model: studio path vs TRL defaults, as a ratio)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PEAK_DATASHEET = 989.4e12
LORA_R, LORA_ALPHA = 16, 32
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=131072, head_dim=128),
    # The 8B's structure (32 layers, 7 projections each, GQA) at widths where the GPU's work is negligible:
    # its steps take as long as the host needs to issue them. For measuring host overhead, not MFU.
    "8b-thin": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=32, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                    max_position_embeddings=131072, head_dim=64),
}
STOCK_BATCH = {"1b": 16, "8b": 8}
# Studio micro-batches: packed rows of 4096 tokens (the QLoRA goal is stated for 4k-token micro-batches).
STUDIO_ROWS = {("1b", "studio"): 8, ("8b", "studio"): 2, ("1b", "studio-qlora"): 2, ("8b", "studio-qlora"): 1,
               ("1b", "studio-full"): 2, ("8b-thin", "studio"): 2, ("8b-thin", "studio-qlora"): 1}
# The QLoRA goal is stated for a 12 GiB budget: the run is told so (training.memory_limit_gib, which the
# studio plans checkpointing for and enforces), as a user of a 12 GB card would have it.
MEMORY_LIMIT_GIB = {"studio-qlora": 12.0}
PACK_LENGTH = 4096


# ----------------------------------------------------------------------------------------------- data
def make_documents(n: int = 3000, vocab: int = 128256, seed: int = 0) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(math.log(384), 0.8, n)), 32, 2048).astype(int)
    return [rng.integers(10, vocab, int(L)).tolist() for L in lengths]


def flops_per_token_terms(shape: str) -> dict:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    d_attn = s["num_attention_heads"] * s["head_dim"]
    per_layer = h * d_attn + 2 * h * kv + d_attn * h + 3 * h * i
    n_mm = layers * per_layer + h * v
    lora_per_layer = sum(LORA_R * (a + b) for a, b in ((h, d_attn), (h, kv), (h, kv), (d_attn, h), (h, i), (h, i),
                                                       (i, h)))
    return {"n_mm": n_mm, "n_lora": layers * lora_per_layer, "layers": layers, "d_attn": d_attn}


def flops(shape: str, method: str, tokens: float, sum_sq_per_token: float) -> float:
    """FLOPs for `tokens` real tokens whose documents have sum(L^2)/sum(L) = sum_sq_per_token."""
    t = flops_per_token_terms(shape)
    attention = 6 * t["layers"] * t["d_attn"] * sum_sq_per_token * tokens
    if method == "full":
        return 6 * t["n_mm"] * tokens + attention
    return tokens * (4 * t["n_mm"] + 6 * t["n_lora"]) + attention


# ---------------------------------------------------------------------------------------------- model
def build_model(shape: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def model_folder(shape: str, with_weights: bool) -> Path:
    """Config and tokenizer on disk (what the studio's planner reads); the random weights too when asked
    (QLoRA quantises through from_pretrained). Same seed, same weights."""
    folder = Path(os.environ.get("BENCH_CACHE", "/tmp/studio-bench")) / shape
    if with_weights and not (folder / "model.safetensors.index.json").is_file() \
            and not (folder / "model.safetensors").is_file():
        model = build_model(shape)
        model.save_pretrained(folder)
        del model
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig
        LlamaConfig(**SHAPES[shape]).save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        tokenizer().save_pretrained(folder)
    return folder


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """A Trainer callback that times whole steps after a warm-up and stops after `seconds`."""

    def __init__(self, seconds: float, warmup: int = 5):
        import torch
        from transformers import TrainerCallback

        from bench.energy import EnergyMeter
        from studio.distributed import agree_any, total
        self.torch, self.seconds, self.warmup = torch, seconds, warmup
        self.start = self.tokens0 = None
        self.steps = 0
        self.step_s, self.last = [], None
        self.result = {}
        # The GPU's energy over the timed steps: at its power limit, a step's time follows its energy.
        self.energy = EnergyMeter(uuid=str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
                                  if torch.cuda.is_available() else None)
        # Python's garbage collector, in the timed window: a full collection walks every object of the process
        # (transformers, torch, the datasets) and holds the host meanwhile.
        self.gc_runs, self.gc_s, self._gc_started = [0, 0, 0], 0.0, None
        timer = self

        class Callback(TrainerCallback):
            # The GPU is synchronised only where the clock starts and stops: a wait in every step would itself
            # leave the GPU idle while the next batch is prepared, which is what is being measured.
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == timer.warmup:
                    timer.torch.cuda.synchronize()
                    timer.start, timer.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                    timer.torch.cuda.reset_peak_memory_stats()
                    timer.energy.restart()
                    timer.last = timer.start
                    gc.callbacks.append(timer.on_gc)
                    print(f"TIMING from step {state.global_step}", flush=True)  # a profiler can attach now
                elif timer.start is not None:
                    timer.steps += 1
                    now = time.perf_counter()
                    timer.step_s.append(now - timer.last)  # host-side: where the host is the bottleneck, its spread
                    timer.last = now
                    # Every process decides together (several GPUs): they stop at the same step.
                    if agree_any(now - timer.start >= timer.seconds)[0]:
                        gc.callbacks.remove(timer.on_gc)
                        timer.torch.cuda.synchronize()
                        steps = sorted(timer.step_s)
                        joules = timer.energy.joules()
                        timer.result = {"seconds": time.perf_counter() - timer.start, "steps": timer.steps,
                                        "joules_per_step": joules and joules / timer.steps,
                                        "tokens": total(state.num_input_tokens_seen - timer.tokens0),
                                        "step_s_median": steps[len(steps) // 2], "step_s_max": steps[-1],
                                        "step_s_min": steps[0], "gc_runs": timer.gc_runs,
                                        "gc_s": round(timer.gc_s, 4)}
                        control.should_training_stop = True
                return control
        self.callback = Callback()

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_runs[info["generation"]] += 1
            self.gc_s += time.perf_counter() - self._gc_started


def common_args(**overrides):
    args = dict(output_dir="/tmp/studio-bench/out", max_steps=100000, learning_rate=1e-4, bf16=True,
                logging_steps=1000000, save_strategy="no", report_to="none", disable_tqdm=True,
                include_num_input_tokens_seen="non_padding", dataloader_num_workers=2, seed=0)
    args.update(overrides)
    return args


# ------------------------------------------------------------------------------------------------ arms
def run_stock(shape: str, docs, seconds: float) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    model = build_model(shape)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM"))
    rows = [{"input_ids": d} for d in docs]

    def pad_to_longest(batch):
        longest = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(batch):
            ids[k, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[k, :len(r["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    timer = Timer(seconds)
    args = TrainingArguments(**common_args(per_device_train_batch_size=STOCK_BATCH[shape], gradient_checkpointing=True,
                                           remove_unused_columns=False))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_to_longest,
                      callbacks=[timer.callback])
    trainer.train()
    return {**timer.result, "method": "lora", "settings": f"padded batch {STOCK_BATCH[shape]}, checkpointing, SDPA"}


def parse_changes(items: list[str]) -> dict:
    """FIELD=VALUE pairs (YAML values) for --plan and --machine."""
    import yaml
    changes = {}
    for item in items or []:
        field, _, value = item.partition("=")
        changes[field.strip()] = yaml.safe_load(value)
    return changes


def studio_config(shape: str, arm: str, location: Path, strategy: str = "auto", memory_limit: float | None = None):
    from studio.config import from_dict
    method = {"studio": "lora", "studio-qlora": "qlora", "studio-full": "full"}[arm]
    return from_dict({"name": f"bench-{shape}-{arm}", "model": {"name_or_path": str(location)},
                      "data": {"max_length": PACK_LENGTH},
                      "method": {"method": method, "rank": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                 "target_modules": PROJECTIONS},
                      "training": {"batch_size": STUDIO_ROWS[(shape, arm)], "learning_rate": 1e-4 if method != "full"
                                   else 1e-5, "max_steps": 100000, "save_steps": 1000000, "eval_steps": 1000000,
                                   "logging_steps": 100000, "precision": "bf16",
                                   "memory_limit_gib": MEMORY_LIMIT_GIB.get(arm, 0.0) if memory_limit is None
                                   else memory_limit},
                      "devices": {"strategy": strategy}})


def studio_plan(cfg, location: Path, plan_changes: dict, machine_changes: dict, data=None):
    """The plan the studio makes for this GPU, then the A/B arm's changes: `machine_changes` alter the facts it
    is made from (liger_installed=false: planned as without Liger), `plan_changes` the plan itself
    (attention=flex_attention, fused_lora=false, gradient_checkpointing=true, uncheckpointed_layers=4,
    pack_4bit_siblings=false, ...). `data`: the training rows' lengths (plan.DataLengths), as a run's set-up
    passes them; None: planned from batch_size x max_length."""
    from dataclasses import replace

    from studio.training.fast.plan import plan_speed
    from studio.training.fast.probe import probe
    machine = replace(probe(cfg, str(location), "cuda"), **machine_changes)
    return plan_speed(cfg, machine, data).changed(**plan_changes)


def run_studio(shape: str, arm: str, docs, seconds: float, extra_callbacks: tuple = (), plan_changes: dict | None = None,
               machine_changes: dict | None = None, strategy: str = "auto",
               memory_limit: float | None = None) -> dict:
    import torch

    from studio import models
    from studio.methods import quantization_for
    from studio.records import Attempt
    from studio.rendering import EncodedSet
    from studio.runs import new_run
    from studio.stages import Job, sft
    from studio.training import loop
    from studio.training.fast import apply
    os.environ.setdefault("STUDIO_HOME", "/tmp/studio-bench/home")
    method = {"studio": "lora", "studio-qlora": "qlora", "studio-full": "full"}[arm]
    quantization = quantization_for(method)
    location = model_folder(shape, with_weights=quantization is not None)
    cfg = studio_config(shape, arm, location, strategy, memory_limit)
    plan = studio_plan(cfg, location, plan_changes or {}, machine_changes or {})
    apply.before_model_load(plan, "cuda")
    if quantization:
        model = models.load_model(str(location), dtype=torch.bfloat16, device="cuda", quantization=quantization,
                                  **apply.model_load_options(plan))
    else:  # the same weights as from_pretrained would give, without writing 16 GB to disk first
        model = build_model(shape)
        model.set_attn_implementation(plan.attention)
    model = loop.add_adapters(model, cfg, quantization, plan, torch.bfloat16)
    rows = EncodedSet(rows=[{"input_ids": d, "labels": d} for d in docs])
    prep = loop.Prepared(cfg, tokenizer(), model, rows, EncodedSet(), "cuda", torch.bfloat16, plan)
    timer = Timer(seconds)
    run = new_run(cfg)
    arguments = loop.arguments(prep, run, Attempt(cfg.training.batch_size, 1))
    trainer = sft.build(prep, Job(run, cfg, False, lambda: False), arguments,
                        [timer.callback, *extra_callbacks, *apply.trainer_callbacks(plan)])
    apply.distribute(trainer, plan)
    check = loss_check(trainer, model, docs[:8])
    trainer.train()
    changes = {**(machine_changes or {}), **(plan_changes or {})}
    switches = ", ".join(f"{k}={v}" for k, v in sorted(changes.items()))
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        switches += (", " if switches else "") + f"PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}"
    limit = f", limit {cfg.training.memory_limit_gib:g} GiB" if cfg.training.memory_limit_gib else ""
    return {**timer.result, "method": method, "loss_check": check, "plan": plan.as_dict(),
            "settings": f"{plan.summary()}, {STUDIO_ROWS[(shape, arm)]} x {PACK_LENGTH}-token rows{limit}"
                        + (f" [A/B: {switches}]" if switches else "")}


def loss_check(trainer, model, docs) -> dict:
    """Training loss of the studio path vs a plain per-document forward (same weights, LoRA B = 0)."""
    import torch
    import torch.nn.functional as F
    model.eval()
    # Both sides under bf16 autocast, as the Trainer runs the model (the LoRA layers live inside the base).
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = 0.0, 0
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        previous = base.config._attn_implementation
        base.set_attn_implementation("sdpa")
        for d in docs:
            ids = torch.tensor([d], device="cuda")
            logits = base(input_ids=ids).logits.float()
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += len(d) - 1
        base.set_attn_implementation(previous)
        reference = total / count
        batch = trainer.data_collator([{"input_ids": d, "labels": d} for d in docs])
        batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items()}
        studio = float(trainer.compute_loss(model, dict(batch)))
    model.train()
    result = {"reference": reference, "studio": studio, "relative_difference": abs(studio - reference) / reference}
    # In evaluation mode the studio's trainer hands the loss to TRL; in training mode it computes it itself (its own
    # LM head path): checked too, its counters put back afterwards.
    kept = {name: getattr(trainer, name) for name in ("_metric_sums", "_metric_count", "_total_train_tokens",
                                                      "_tokens_not_summed") if hasattr(trainer, name)}
    seen, metrics = trainer.state.num_input_tokens_seen, {k: list(v) for k, v in trainer._metrics["train"].items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        training = float(trainer.compute_loss(model, dict(batch)))
    for name, value in kept.items():
        setattr(trainer, name, value)
    trainer.state.num_input_tokens_seen = seen
    trainer._metrics["train"].clear()
    trainer._metrics["train"].update(metrics)
    result["studio_training_mode"] = training
    result["relative_difference"] = max(result["relative_difference"], abs(training - reference) / reference)
    return result


def matmul_peak() -> float:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - start)


def child(shape: str, arm: str, seconds: float, changes: dict) -> dict:
    import torch

    from studio.distributed import world
    where = world()
    if where.distributed:
        torch.cuda.set_device(where.local_rank)
    docs = make_documents()
    lengths = [len(d) for d in docs]
    sum_sq_per_token = sum(L * L for L in lengths) / sum(lengths)
    result = run_stock(shape, docs, seconds) if arm == "stock" else run_studio(
        shape, arm, docs, seconds, plan_changes=changes.get("plan"), machine_changes=changes.get("machine"),
        strategy=changes.get("strategy", "auto"), memory_limit=changes.get("memory_limit"))
    tokens, secs = result["tokens"], result["seconds"]
    total = flops(shape, result["method"], tokens, sum_sq_per_token)
    return {**result, "shape": shape, "arm": arm, "gpus": where.size, "tokens_per_s": tokens / secs,
            "mfu": total / secs / PEAK_DATASHEET / where.size,
            "achieved_tflops": total / secs / 1e12, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            # The allocator's side: what it held from the driver, and how often it had to give cached blocks
            # back and retry (each time a device-wide synchronisation) because a limit was reached.
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0)}


# ------------------------------------------------------------------------------------------------ main
def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def table(rows: list[dict]) -> str:
    stock = {r["shape"]: r["tokens_per_s"] for r in rows if r["arm"] == "stock" and "tokens_per_s" in r}
    lines = ["| shape | arm | settings | tokens/s | runs (tokens/s) | MFU | MFU vs measured peak | peak GiB | GPU J a step (W) "
             "| vs stock | loss check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['arm']} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / stock[r['shape']]:.2f}x" if r["shape"] in stock else "-"
        check = r.get("loss_check")
        check_text = f"{check['relative_difference']:.1e}" if check else "-"
        repeats = r.get("repeats", [r["tokens_per_s"]])
        runs = f"{len(repeats)}: {min(repeats):,.0f}-{max(repeats):,.0f}" if len(repeats) > 1 else "1"
        joules = r.get("joules_per_step")
        energy = f"{joules:.0f} ({joules * r['steps'] / r['seconds']:.0f})" if joules else "-"
        lines.append(f"| {r['shape']} | {r['arm']} | {r['settings']} | {r['tokens_per_s']:,.0f} | {runs} | "
                     f"{100 * r['mfu']:.1f}% | {100 * r['mfu'] * PEAK_DATASHEET / r['matmul_peak']:.1f}% | "
                     f"{r['peak_gib']:.1f} | {energy} | {ratio} | {check_text} |")
    return "\n".join(lines)


def child_result(command: list[str], shape: str, arm: str, out: Path, log_name: str,
                 timeout: float | None = None) -> dict:
    """Run one arm's child process; its RESULT row, or a row that says why it failed (its output kept in
    out/log_name). Shared by the benchmarks here."""
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:  # the child is killed: it must not hold the GPU for the next arm
        def text(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        done = subprocess.CompletedProcess(command, -9, text(err.stdout),
                                           text(err.stderr) + f"\ntimed out after {timeout} s")
    found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    row = json.loads(found[-1]) if found else {"shape": shape, "arm": arm,
                                               "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    row["wall_s"] = time.time() - started
    if not found:
        out.mkdir(parents=True, exist_ok=True)
        (out / log_name).write_text(done.stdout[-20000:] + "\n" + done.stderr[-40000:])
        print(done.stderr[-3000:], file=sys.stderr)
    return row


def run_child(shape: str, arm: str, seconds: float, out: Path, changes: dict, gpus: int = 1) -> dict:
    """One arm in its own process (on several GPUs, one per GPU under torchrun); its result row, or a row that
    says why it failed."""
    launch = [sys.executable]
    if gpus > 1:
        os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    return child_result([*launch, __file__, "--child", shape, arm, "--seconds", str(seconds),
                         "--changes", json.dumps(changes)], shape, arm, out,
                        f"{shape}-{arm}{f'-{gpus}gpus' if gpus > 1 else ''}.log")


def scaling(one: dict, many: dict) -> dict:
    """The several-GPU row with its scaling efficiency against the same arm on one GPU."""
    row = dict(many)
    if "error" not in one and "error" not in many:
        row["one_gpu_tokens_per_s"] = one["tokens_per_s"]
        row["scaling"] = many["tokens_per_s"] / (many["gpus"] * one["tokens_per_s"])
    return row


def scaling_table(rows: list[dict]) -> str:
    lines = ["| shape | arm | GPUs | strategy | tokens/s (all GPUs) | one GPU | scaling | MFU per GPU | peak GiB (GPU 0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['arm']} | {r.get('gpus', '?')} | failed: {r['error'][:100]} | | | | | |")
            continue
        strategy = (r.get("plan") or {}).get("strategy") or "-"
        lines.append(f"| {r['shape']} | {r['arm']} | {r['gpus']} | {strategy} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('one_gpu_tokens_per_s', 0):,.0f} | {100 * r.get('scaling', 0):.1f}% | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


def combine(repeats: list[dict]) -> dict:
    """One row for an arm run several times: the run with the median tokens/s (its MFU and settings with it),
    every run's tokens/s, and the highest peak memory of any run. Failed runs are counted, not averaged in."""
    done = sorted((r for r in repeats if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not done:
        return repeats[-1]
    row = dict(done[(len(done) - 1) // 2])  # the lower middle for an even count: never flatters
    row["repeats"] = [r["tokens_per_s"] for r in repeats if "error" not in r]
    row["failed_repeats"] = len(repeats) - len(done)
    row["peak_gib"] = max(r["peak_gib"] for r in done)
    return row


def qlora_ratios(rows: list[dict]) -> list[str]:
    """The QLoRA goal's measure: QLoRA's tokens/s as a share of LoRA bf16's, per shape."""
    speed = {(r["shape"], r["arm"]): r["tokens_per_s"] for r in rows if "error" not in r}
    return [f"{shape}: QLoRA at {100 * speed[(shape, 'studio-qlora')] / speed[(shape, 'studio')]:.1f}% of LoRA "
            f"bf16's tokens/s" for shape in dict.fromkeys(r["shape"] for r in rows)
            if (shape, "studio") in speed and (shape, "studio-qlora") in speed]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--arms", default="stock,studio,studio-qlora,studio-full")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--child", nargs=2, metavar=("SHAPE", "ARM"))
    p.add_argument("--cpu", action="store_true", help="CPU mode on the bundled model")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="appended to the result files' names (A/B runs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every arm this many times, in turn, and report the median (host-bound arms vary "
                        "from run to run by more than 10%%)")
    p.add_argument("--plan", action="append", default=[], metavar="FIELD=VALUE",
                   help="A/B: change a field of the studio arms' speed plan, e.g. attention=flex_attention, "
                        "fused_lora=false, gradient_checkpointing=true, uncheckpointed_layers=4, "
                        "pack_4bit_siblings=false (repeatable)")
    p.add_argument("--machine", action="append", default=[], metavar="FIELD=VALUE",
                   help="A/B: plan as if the machine were otherwise, e.g. liger_installed=false (repeatable)")
    p.add_argument("--gpus", type=int, default=1, help="also run each studio arm on this many GPUs (torchrun) and "
                                                       "report the scaling efficiency against one")
    p.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"),
                   help="with --gpus: how the GPUs share the work (devices.strategy)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="training.memory_limit_gib for the studio arms (default: 12 for studio-qlora, else none)")
    p.add_argument("--changes", default="{}", help=argparse.SUPPRESS)  # parent -> child
    args = p.parse_args()
    if args.cpu:
        from bench.cpu import main as cpu_main
        return cpu_main(Path(args.out))
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.seconds, json.loads(args.changes))), flush=True)
        return 0
    changes = {"plan": parse_changes(args.plan), "machine": parse_changes(args.machine), "strategy": args.strategy}
    if args.memory_limit is not None:
        changes["memory_limit"] = args.memory_limit
    if args.gpus > 1:
        return several_gpus(args, changes)
    import torch
    device = torch.cuda.get_device_name(0)
    peak = matmul_peak()
    runs: dict = {}  # (shape, arm) -> one row per repetition
    for shape in args.shapes.split(","):
        for _ in range(args.repeat):  # round-robin, so a slow spell of the machine does not hit one arm only
            for arm in args.arms.split(","):
                if arm == "studio-full" and shape != "1b":
                    continue
                row = run_child(shape, arm, args.seconds, Path(args.out), changes)
                row["matmul_peak"] = peak
                runs.setdefault((shape, arm), []).append(row)
                print(json.dumps(row), flush=True)
    rows = [combine(found) for found in runs.values()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M") + (f"-{args.tag}" if args.tag else "")
    meta = {"device": device, "matmul_peak_tflops": peak / 1e12, "versions": versions(), "seconds": args.seconds,
            "repeat": args.repeat, "changes": changes}
    (out / f"gpu-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = (f"{device}; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s; {meta['versions']}\n\n{table(rows)}\n"
            + "".join(f"\n{line}" for line in qlora_ratios(rows)) + "\n")
    (out / f"gpu-{stamp}.md").write_text(text)
    print(text)
    return 0


def several_gpus(args, changes: dict) -> int:
    """--gpus N: each studio arm on one GPU, then on N; tokens/s, MFU per GPU, scaling efficiency."""
    import torch
    device = torch.cuda.get_device_name(0)
    found = torch.cuda.device_count()
    if found < args.gpus:
        print(f"--gpus {args.gpus}: this machine has {found} GPU(s)", file=sys.stderr)
        return 2
    rows = []
    for shape in args.shapes.split(","):
        for arm in args.arms.split(","):
            if arm == "stock" or (arm == "studio-full" and shape != "1b" and args.strategy != "fsdp"):
                continue
            one = run_child(shape, arm, args.seconds, Path(args.out), changes)
            many = run_child(shape, arm, args.seconds, Path(args.out), changes, gpus=args.gpus)
            rows.append(scaling(one, many))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M") + f"-{args.gpus}gpus" + (f"-{args.tag}" if args.tag else "")
    meta = {"device": device, "gpus": args.gpus, "versions": versions(), "seconds": args.seconds, "changes": changes}
    (out / f"gpu-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = f"{args.gpus} x {device}; {meta['versions']}\n\n{scaling_table(rows)}\n"
    (out / f"gpu-{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
