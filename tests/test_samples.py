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


# --- tool-calling rows are asked with their tools -------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": CITY}}]
TOOL_ROW = {"messages": [{"role": "user", "content": "What is the weather in Lisbon?"},
                         {"role": "assistant", "content": "",
                          "tool_calls": [{"type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}]}],
            "tools": WEATHER}


def _tool_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from tests.test_data_wild import TOOL_TEMPLATE  # a ChatML template that lists the tools it is given
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.pad_token = "<|endoftext|>"  # batches of prompts are padded
    return tokenizer


def _greedy_text(model, tokenizer, text: str, max_new_tokens: int) -> str:
    from studio.rendering import stop_token_ids
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_held_out_tool_rows_are_sampled_with_their_tools(tiny_model):
    from studio.training.callbacks import prompt_text
    from studio.training.loop import sample_conversations
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    prompts = sample_conversations(tiny_config(tiny_model), [TOOL_ROW, plain])
    assert prompts == [{"messages": TOOL_ROW["messages"][:1], "tools": WEATHER}, plain["messages"][:1]]
    assert [prompt_text(p) for p in prompts] == ["What is the weather in Lisbon?", "Hi"]


def test_sample_replies_give_the_template_the_rows_tools(tiny_model):
    """The reply to a tool row is the model's continuation of the prompt rendered with the tools, exactly as
    training rendered it (the template's tool list included), not of the bare question."""
    from transformers import AutoModelForCausalLM

    from studio.rendering import reply_prompt
    from studio.training.callbacks import SampleReplies
    tokenizer = _tool_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    row = {"messages": TOOL_ROW["messages"][:1], "tools": WEATHER}
    with_tools = tokenizer.apply_chat_template(row["messages"], tools=WEATHER, tokenize=False,
                                               add_generation_prompt=True)
    assert "TOOLS:get_weather;" in with_tools and reply_prompt(tokenizer, row) == with_tools
    sampler = SampleReplies(None, tokenizer, [row, row["messages"]], 256, max_new_tokens=12)
    asked, bare = sampler.answer(model)
    assert asked == _greedy_text(model, tokenizer, with_tools, 12)
    assert bare == _greedy_text(model, tokenizer, reply_prompt(tokenizer, row["messages"]), 12)


def test_evaluation_answers_and_scores_tool_rows_with_their_tools(tiny_model):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from studio import evaluation
    from studio.rendering import reply_prompt
    tokenizer = _tool_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    rows = evaluation.rows_from_conversations([{**TOOL_ROW, "messages": [*TOOL_ROW["messages"][:1],
                                                                         {"role": "assistant", "content": "Sunny."}]},
                                               plain])
    assert rows[0].tools == WEATHER and rows[0].conversation == {"messages": TOOL_ROW["messages"][:1],
                                                                 "tools": WEATHER}
    assert rows[1].tools is None and rows[1].conversation == plain["messages"][:1]
    chat = SimpleNamespace(tokenizer=tokenizer, model=model)
    answers = evaluation.generate_answers(chat, [r.conversation for r in rows[:1]], 12)
    assert answers == [_greedy_text(model, tokenizer, reply_prompt(tokenizer, rows[0].conversation), 12)]
    # The reference loss is measured on the same rendering: with the tools, the prompt is longer.
    with_tools = evaluation.reference_loss(chat, rows[:1])
    without = evaluation.reference_loss(chat, [evaluation.EvalRow(rows[0].prompt_messages, rows[0].reference)])
    assert with_tools["tokens"] == without["tokens"] and with_tools["loss"] != without["loss"]
