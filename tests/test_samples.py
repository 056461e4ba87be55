"""Sample replies while training: the same prompts answered by the starting model (step 0) and at every evaluation,
written to samples.jsonl and shown on the Train tab as one row per prompt and one column per step."""

import json
import threading

import torch

from studio.records import State
from studio.runs import new_run
from studio.service import Studio
from tests.conftest import sft_trainer, tiny_config, train_here


def _rows(run) -> list[dict]:
    path = run.path / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _held_out_prompts(cfg, n: int) -> list[str]:
    from studio.data import load_splits
    eval_rows = load_splits(cfg.data, seed=cfg.training.seed).eval[:n]
    return [next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user") for row in eval_rows]


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Replies written here, one prompt at a time (no padding), independently of the studio's own code."""
    from studio.rendering import stop_token_ids
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def test_replies_at_the_start_and_at_each_evaluation_from_the_right_models(tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = tiny_config(tiny_model)  # 8 steps, evaluated at 4 and 8
    run = new_run(cfg)
    assert train_here(run).state is State.COMPLETED
    rows = _rows(run)
    prompts = _held_out_prompts(cfg, 3)
    assert [(r["step"], r["prompt"]) for r in rows] == [(step, p) for step in (0, 4, 8) for p in prompts]

    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert [r["reply"] for r in rows if r["step"] == 0] == _greedy(base, tokenizer, prompts)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(run.adapter_dir)).eval()
    last = [r["reply"] for r in rows if r["step"] == 8]
    assert last == _greedy(tuned, tokenizer, prompts)
    assert last != [r["reply"] for r in rows if r["step"] == 0]  # eight steps at this rate change the replies

    # The Train tab's table: a row per prompt, the base reply, then a column per evaluation, newest last.
    snap = Studio().snapshot(run.id, "local")
    assert snap["samples_layout"] == "by step"
    assert [list(row) for row in snap["samples"]] == [["prompt", "base", "step 4", "step 8"]] * 3
    assert [row["prompt"] for row in snap["samples"]] == prompts
    assert snap["samples"][0]["step 8"] == last[0]

    from studio.ui import train_tab
    shown = train_tab.show(snap)[5]
    assert shown["visible"] and list(shown["value"].columns) == ["prompt", "base", "step 4", "step 8"]


def test_base_replies_come_from_the_model_with_its_adapter_off(tiny_model):
    """After training, the starting model's replies are the base model's own, and answering puts the model back in
    training mode without touching the random numbers training draws."""
    from transformers import AutoModelForCausalLM
    from studio.training.callbacks import SampleReplies
    cfg = tiny_config(tiny_model, training={"save_steps": 100, "eval_steps": 100})
    trainer, prep = sft_trainer(cfg)
    trainer.train()
    prompts = ["What is the colour of the sea?", "Tell me a joke, please."]
    sampler = SampleReplies(None, prep.tokenizer, [[{"role": "user", "content": p}] for p in prompts], 128)
    prep.model.train()
    rng = torch.get_rng_state()
    base = sampler.answer(prep.model, base=True)
    tuned = sampler.answer(prep.model)
    assert prep.model.training and torch.equal(torch.get_rng_state(), rng)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert base == _greedy(plain, prep.tokenizer, prompts)
    assert tuned == _greedy(prep.model.eval(), prep.tokenizer, prompts) and tuned != base


def test_typed_prompts_are_answered_and_training_is_unchanged_by_them(tiny_model):
    """Prompts typed in replace the held-out ones (commas and all); answering them changes nothing in training,
    even with dropout drawing random numbers; samples 0 writes none."""
    typed = ["Say hello, then goodbye.", "What is two plus two?"]
    steps = {"max_steps": 4, "eval_steps": 2, "save_steps": 100}
    with_samples = new_run(tiny_config(tiny_model, method={"dropout": 0.1}, name="typed",
                                       training={**steps, "sample_prompts": typed}))
    without = new_run(tiny_config(tiny_model, method={"dropout": 0.1}, name="none", training={**steps, "samples": 0}))
    train_here(with_samples), train_here(without)
    assert [(r["step"], r["prompt"]) for r in _rows(with_samples)] == [(s, p) for s in (0, 2, 4) for p in typed]
    assert not (without.path / "samples.jsonl").exists()
    losses = [[m.loss for m in run.metrics() if m.is_training] for run in (with_samples, without)]
    assert losses[0] == losses[1]


def test_a_resumed_run_writes_each_step_once(tiny_model, inject):
    """Stopped at step 7 after the evaluation at 6, resumed from checkpoint 4: step 6 is answered again, not twice."""
    cfg = tiny_config(tiny_model, training={"max_steps": 8, "eval_steps": 2, "save_steps": 4, "samples": 1})
    run = new_run(cfg)
    stop, stopped = threading.Event(), []

    def stop_once_at_step_7(args, state, control, **kwargs):
        if state.global_step == 7 and not stopped:
            stopped.append(True)
            stop.set()
    inject("on_step_end", stop_once_at_step_7)
    train_here(run, stop)
    assert [r["step"] for r in _rows(run)] == [0, 2, 4, 6]
    stop.clear()
    assert train_here(run, resume=True).state is State.COMPLETED
    assert [r["step"] for r in _rows(run)] == [0, 2, 4, 6, 8]


def test_tensorboard_logs_only_when_the_package_is_there(tiny_model):
    from transformers.integrations.integration_utils import is_tensorboard_available
    run = new_run(tiny_config(tiny_model, training={"max_steps": 2, "eval_steps": 2, "save_steps": 100,
                                                    "samples": 0}))
    train_here(run)
    logs = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert bool(logs) == is_tensorboard_available()
