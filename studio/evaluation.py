"""Does the tuned model beat the one it started from? The engine of an evaluation (stages/evaluate.py runs it).

On rows with a reference answer (the run's own held-out rows, or a file of conversations), both models answer
every prompt with greedy decoding, so the same settings give the same report; each answer is scored against
the reference with the measures that fit the data (studio/metrics.py), and each model's loss and perplexity on
the reference answers are measured. Optionally both answer the studio's general questions (studio/probe.py) to
see what fine-tuning made the model forget, and a judge model grades the answers against a rubric.

What it knows nothing about: where the report is shown (report_page.py writes the readable page; the Evaluate
tab and `studio eval` show the summary) and how a run trains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from studio.errors import StudioError

# Answers are generated this many prompts at a time (left-padded); more is faster on a GPU, and on a CPU the
# batch costs little more than one prompt while the model is small.
BATCH = 8
# The general questions' answers are short ("Paris", "7"); a chatty model has said them well within this.
PROBE_TOKENS = 32


@dataclass
class EvalRow:
    prompt_messages: list[dict]  # the conversation up to the answer to write
    reference: str  # the answer in the data
    tools: list | None = None  # the tools the row offers: the template is given them, as in training

    @property
    def conversation(self) -> list[dict] | dict:
        """What generate_answers takes: the turns, or the row with its tools."""
        return {"messages": self.prompt_messages, "tools": self.tools} if self.tools else self.prompt_messages

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.prompt_messages) if m["role"] == "user"), "")


def rows_from_conversations(examples: list[dict]) -> list[EvalRow]:
    """Each conversation becomes a prompt (everything before its last assistant turn) and its reference (that
    turn). Conversations without an assistant reply after a user turn are skipped."""
    rows = []
    for example in examples:
        messages = example.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or not any(m.get("role") == "user" for m in messages[:last]):
            continue
        rows.append(EvalRow([dict(m) for m in messages[:last]], str(messages[last]["content"]),
                            example.get("tools") or None))
    return rows


def generate_answers(chat, conversations: list[list[dict] | dict], max_new_tokens: int,
                     on_batch: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None
                     ) -> list[str]:
    """Greedy answers of `chat` (inference.ChatModel) to each conversation (turns, or a row with its tools:
    EvalRow.conversation), a batch at a time."""
    import torch

    from studio.rendering import reply_prompt, stop_token_ids
    tokenizer, model = chat.tokenizer, chat.model
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its own last token
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), BATCH):
            if should_stop is not None and should_stop():
                raise StopEvaluation
            batch = [reply_prompt(tokenizer, c) for c in conversations[start:start + BATCH]]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                     eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
            if on_batch is not None:
                on_batch(len(answers))
    finally:
        tokenizer.padding_side = side
    return answers


class StopEvaluation(Exception):
    """A Stop arrived while the models were answering."""


def reference_loss(chat, rows: list[EvalRow], max_length: int = 2048) -> dict:
    """The model's mean loss per reference-answer token over every row, and its perplexity (exp of that loss):
    how surprised it is by the answers the data gives. Lower is closer to the data."""
    import torch

    from studio.rendering import IGNORE, encode
    total, count = 0.0, 0
    for row in rows:
        example = {"messages": [*row.prompt_messages, {"role": "assistant", "content": row.reference}]}
        if row.tools:
            example["tools"] = row.tools
        ids, labels = encode(chat.tokenizer, example)
        ids, labels = ids[:max_length], labels[:max_length]
        if not any(label != IGNORE for label in labels[1:]):
            continue
        input_ids = torch.tensor([ids], device=chat.model.device)
        target = torch.tensor([labels], device=chat.model.device)
        with torch.inference_mode():
            logits = chat.model(input_ids=input_ids).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=IGNORE,
                                                   reduction="sum")
        total += float(losses)
        count += int((target[0, 1:] != IGNORE).sum())
    if not count:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = total / count
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50.0)), 3), "tokens": count}


SIDES = ("base", "tuned")  # the model compared against (the base, or another run) and the run evaluated


def score_rows(rows: list[EvalRow], answers: dict[str, list[str]], metrics: list[str], pattern: str) -> list[dict]:
    """The per-row table: prompt, reference, each side's answer, and under each measure's name the two scores,
    {"base": x, "tuned": y} (metrics.summarize reads them so)."""
    from studio.metrics import score
    table = []
    for i, row in enumerate(rows):
        entry = {"row": i + 1, "prompt": row.prompt, "reference": row.reference,
                 **{side: answers[side][i] for side in SIDES}}
        for metric in metrics:
            entry[metric] = {side: score(metric, answers[side][i], row.reference, pattern) for side in SIDES}
        table.append(entry)
    return table


def probe_items(count: int = 0) -> list:
    """The general questions to ask: all of them, or `count` spread evenly over the file (and so its topics)."""
    from studio.probe import load_probe
    items = load_probe()
    if not count or count >= len(items):
        return items
    return [items[(i * len(items)) // count] for i in range(count)]


def forgetting_check(generate: Callable[[list[str]], list[str]], label: str, progress: Callable[[str], None],
                     count: int = 0) -> list:
    """Which of the studio's general questions (all, or `count` of them) a model answers right (studio/probe.py)."""
    from studio.probe import answer_probe, passes
    items = probe_items(count)
    progress(f"Asking the {label} model {len(items)} general questions.")
    replies = answer_probe(generate, items)
    return [{"id": item.id, "prompt": item.prompt, "answer": item.answer, "reply": reply,
             "passed": passes(item, reply)} for item, reply in zip(items, replies)]


def judge_answers(judge, rows: list[dict], rubric: str, sides: tuple[str, str] = SIDES, max_new_tokens: int = 8) -> dict:
    """A judge model grades each row's two answers against the rubric: which is better, or a tie. The order the
    answers are shown in alternates row by row, so a judge that always prefers the first one comes out even."""
    wins = {sides[0]: 0, sides[1]: 0, "tie": 0, "unclear": 0}
    verdicts = []
    prompts = []
    for i, row in enumerate(rows):
        first, second = (sides if i % 2 == 0 else sides[::-1])
        prompts.append((first, second, [{"role": "user", "content": (
            f"You grade answers. Rubric: {rubric.strip()}\n\nQuestion: {row['prompt']}\n\nAnswer A: {row[first]}\n\n"
            f"Answer B: {row[second]}\n\nWhich answer follows the rubric better? Reply with exactly one of: A, B, "
            "tie.")}]))
    replies = generate_answers(judge, [p[2] for p in prompts], max_new_tokens)
    for (first, second, _), reply in zip(prompts, replies):
        word = reply.strip().split()[0].strip(".:,!").lower() if reply.strip() else ""
        picked = first if word == "a" else second if word == "b" else "tie" if word == "tie" else "unclear"
        wins[picked] += 1
        verdicts.append({"reply": reply[:200], "picked": picked})
    return {"rubric": rubric, "wins": wins, "verdicts": verdicts, "judged": len(rows)}


def lm_eval_benchmark(task: str, locations: dict[str, str]) -> dict:
    """One lm-eval task on each model, where lm-eval is installed and the task's data is on this machine; else
    what to do. Not needed for anything else in the report."""
    try:
        import lm_eval
    except ImportError:
        return {"task": task, "error": "lm-eval is not installed: pip install lm-eval, and make its task data "
                                       "available offline (HF_DATASETS_OFFLINE=1 needs it in the datasets cache)."}
    results = {}
    for side, location in locations.items():
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={location}", tasks=[task],
                                          batch_size=8)
            results[side] = out["results"].get(task, {})
        except Exception as err:  # noqa: BLE001 - a missing task or dataset is reported, not fatal
            return {"task": task, "error": f"lm-eval could not run {task!r}: {type(err).__name__}: {err}"[:500]}
    return {"task": task, "results": results}


def timestamp() -> float:
    return round(time.time(), 3)


def check_metrics(names: list[str]) -> list[str]:
    from studio.metrics import METRICS
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise StudioError(f"evaluate.metrics: {', '.join(unknown)} is not a measure the studio has. Use 'auto' or "
                          f"some of: {', '.join(METRICS)}.")
    return names
