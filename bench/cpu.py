"""CPU mode: the bundled SmolLM2-135M on the demo data, studio path vs TRL's stock defaults, as a ratio.

    python bench/bench.py --cpu        (or: python -m bench.cpu)

stock:  SFTTrainer + PEFT LoRA (same r/alpha/targets) with SFTConfig's defaults (bf16 on, gradient
        checkpointing on), TRL tokenising the conversations itself; batch 8.
studio: the studio's own path (prepare -> speed plan -> trainer) with presets/demo.yaml; batch 8.
studio-fused: the same with training.fused_kernels=on (fused LoRA, which 'auto' uses on GPUs only).
Each arm runs in its own process and times steps after one warm-up step. Absolute CPU times vary with the
machine; the ratio is the result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TIMED_STEPS = {"stock": 2, "studio": 6, "studio-fused": 6}


class StepTimer:
    def __init__(self, timed: int):
        from transformers import TrainerCallback
        self.times: list[float] = []
        self.tokens: list[int] = []
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.times.append(time.perf_counter())
                outer.tokens.append(state.num_input_tokens_seen)
                if len(outer.times) > timed:
                    control.should_training_stop = True
                return control
        self.callback = Callback()

    def result(self) -> dict:
        seconds = self.times[-1] - self.times[0]
        steps = len(self.times) - 1
        return {"seconds_per_step": seconds / steps, "tokens_per_s": (self.tokens[-1] - self.tokens[0]) / seconds,
                "timed_steps": steps}


def run_stock() -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from studio import models
    from studio.config import ModelConfig
    from studio.data import DEMO_TRAIN
    location = models.resolve("bundled")
    tokenizer = models.load_tokenizer(ModelConfig(), location)
    model = models.load_model(location)
    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]
    timer = StepTimer(TIMED_STEPS["stock"])
    args = SFTConfig(output_dir="/tmp/studio-cpu-bench", per_device_train_batch_size=8, max_steps=100, report_to="none",
                     include_num_input_tokens_seen="non_padding", save_strategy="no", disable_tqdm=True,
                     use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer.callback],
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return {**timer.result(), "settings": f"TRL defaults: bf16={args.bf16}, checkpointing={args.gradient_checkpointing}"}


def run_studio(fused: bool = False) -> dict:
    from studio.paths import PRESETS_DIR
    from studio.presets import load_run_config
    from studio.records import Attempt
    from studio.runs import new_run
    from studio.stages import Job, sft
    from studio.training import loop
    from studio.training.fast import apply
    os.environ.setdefault("STUDIO_HOME", "/tmp/studio-cpu-bench/home")
    cfg = load_run_config(PRESETS_DIR / "demo.yaml", ["training.max_steps=100", "training.eval_steps=1000",
                                                      "training.save_steps=1000"]
                          + (["training.fused_kernels=on"] if fused else []))
    run = new_run(cfg)
    job = Job(run, cfg, False, lambda: False)
    prep = loop.prepare(job, loop.Recipe(sft.encode, sft.build))
    timer = StepTimer(TIMED_STEPS["studio-fused" if fused else "studio"])
    arguments = loop.arguments(prep, run, Attempt(cfg.training.batch_size, cfg.training.grad_accum))
    sft.build(prep, job, arguments, [timer.callback, *apply.trainer_callbacks(prep.plan)]).train()
    return {**timer.result(), "settings": prep.plan.summary() + f", {prep.dtype}"}


def main(out: Path) -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        arm = sys.argv[2]
        result = run_stock() if arm == "stock" else run_studio(fused=arm == "studio-fused")
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    rows = {}
    for arm in ("studio", "studio-fused", "stock"):
        done = subprocess.run([sys.executable, __file__, "--child", arm], capture_output=True, text=True)
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows[arm] = json.loads(found[-1])
        print(arm, rows[arm], flush=True)
    import torch
    ratio = rows["stock"]["seconds_per_step"] / rows["studio"]["seconds_per_step"]
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}
    text = (f"CPU mode, bundled SmolLM2-135M, demo data, batch 8 ({meta['machine']}, torch {meta['torch']})\n\n"
            "| arm | settings | seconds/step | tokens/s |\n|---|---|---|---|\n" +
            "".join(f"| {a} | {r['settings']} | {r['seconds_per_step']:.1f} | {r['tokens_per_s']:.0f} |\n"
                    for a, r in rows.items()) + f"\nstudio is {ratio:.1f}x faster per step than TRL's defaults; fused LoRA "
            f"on the CPU: {rows['studio']['seconds_per_step'] / rows['studio-fused']['seconds_per_step']:.2f}x.\n")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    (out / f"cpu-{stamp}.md").write_text(text)
    (out / f"cpu-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratio": ratio}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("STUDIO_MODEL_CACHE", str(ROOT / ".studio-test-cache" / "models"))
    raise SystemExit(main(ROOT / "bench" / "results"))
