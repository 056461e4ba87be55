"""GRPO's rewards, chosen and weighted in the page instead of written as code.

Each reward is a function TRL calls with the prompts, the completions and the row's other columns (here
``answer``, the reference), returning one number per completion, higher for better:

  regex        1 if the reply matches the pattern, else 0 (a format: "^Ahoy", "\\\\boxed\\{.*\\}", ...)
  answer       1 if the reply matches the reference answer: exact (after trimming and case), numeric (its last
               number equals the reference's), or contains (the reference appears in it); else 0
  length       1 at the target number of words, 1/2 at twice (or no) words off it, 1/3 at three times...:
               never flat, so replies a little closer to the target always score a little better
  json         1 if the reply is valid JSON (a fenced ```json block counts), else 0
  words        the share of must-contain words present minus the share of must-not-contain words present
  reward_run   a finished reward-model run's score of the prompt and reply
  code         reward(prompts, completions, **columns) from a Python file of the person's own; never on a
               shared studio (it runs code)

This module needs torch only for a reward-model run.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from studio.errors import StudioError

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?")


@dataclass
class Reward:
    name: str
    function: Callable
    weight: float


def text_of(completion) -> str:
    """A completion as TRL passes it: text, or a list of turns whose assistant content is the reply."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(t.get("content", "") for t in completion if isinstance(t, dict))
    return str(completion)


def _named(name: str, function: Callable) -> Callable:
    function.__name__ = name  # TRL logs each reward under its function's name: rewards/<name>/mean
    return function


def regex_reward(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise StudioError(f"grpo.regex {pattern!r} is not a valid regular expression ({err}).") from None
    return _named("regex", lambda completions, **_: [1.0 if compiled.search(text_of(c)) else 0.0
                                                      for c in completions])


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text or "")
    for candidate in reversed(found):
        try:
            return float(candidate.replace(",", ""))
        except ValueError:
            continue
    return None


def answer_reward(mode: str) -> Callable:
    def score(reply: str, answer: str) -> float:
        if not answer:
            return 0.0
        if mode == "exact":
            return float(reply.strip().lower() == answer.strip().lower())
        if mode == "numeric":
            got, want = last_number(reply), last_number(answer)
            return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))
        return float(answer.strip().lower() in reply.lower())
    return _named("answer", lambda completions, answer=None, **_: [
        score(text_of(c), a or "") for c, a in zip(completions, answer or [""] * len(completions))])


def length_reward(target_words: int) -> Callable:
    def score(reply: str) -> float:
        words = len(reply.split())
        return 1.0 / (1.0 + abs(words - target_words) / target_words)
    return _named("length", lambda completions, **_: [score(text_of(c)) for c in completions])


def _is_json(reply: str) -> bool:
    body = reply.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def json_reward() -> Callable:
    return _named("json", lambda completions, **_: [float(_is_json(text_of(c))) for c in completions])


def words_reward(required: list[str], forbidden: list[str]) -> Callable:
    def score(reply: str) -> float:
        lower = reply.lower()
        good = sum(w in lower for w in required) / len(required) if required else 0.0
        bad = sum(w in lower for w in forbidden) / len(forbidden) if forbidden else 0.0
        return good - bad
    return _named("words", lambda completions, **_: [score(text_of(c)) for c in completions])


def code_reward(path: str) -> Callable:
    spec = importlib.util.spec_from_file_location("studio_user_reward", path)
    if spec is None or spec.loader is None:
        raise StudioError(f"grpo.reward_code {path!r} is not a Python file that can be loaded.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the person's own code: say where it broke
        raise StudioError(f"grpo.reward_code {path}: loading it failed ({type(err).__name__}: {err}).") from None
    function = getattr(module, "reward", None)
    if not callable(function):
        raise StudioError(f"grpo.reward_code {path} has no function reward(prompts, completions, **columns).")

    def call(prompts, completions, **columns):
        scores = function(prompts, [text_of(c) for c in completions], **columns)
        return [float(s) for s in scores]
    return _named("code", call)


def words_of(text: str) -> list[str]:
    return [w.strip().lower() for w in (text or "").split(",") if w.strip()]


def build(settings, shared: bool, reward_model: Callable | None = None) -> list[Reward]:
    """The rewards a GRPO run's settings turn on (a weight of 0 turns one off). `shared`: a shared studio,
    where a reward of one's own code is refused."""
    rewards = []
    if settings.regex and settings.regex_weight:
        rewards.append(Reward("regex", regex_reward(settings.regex), settings.regex_weight))
    if settings.answer_match != "off" and settings.answer_weight:
        rewards.append(Reward("answer", answer_reward(settings.answer_match), settings.answer_weight))
    if settings.length_target_words and settings.length_weight:
        rewards.append(Reward("length", length_reward(settings.length_target_words), settings.length_weight))
    if settings.json_weight:
        rewards.append(Reward("json", json_reward(), settings.json_weight))
    required, forbidden = words_of(settings.must_contain), words_of(settings.must_not_contain)
    if (required or forbidden) and settings.words_weight:
        rewards.append(Reward("words", words_reward(required, forbidden), settings.words_weight))
    if settings.reward_run and settings.reward_run_weight:
        if reward_model is None:
            raise StudioError("grpo.reward_run names a reward model that could not be loaded.")
        rewards.append(Reward("reward_model", _named("reward_model", reward_model), settings.reward_run_weight))
    if settings.reward_code:
        if shared:
            raise StudioError("A reward written as Python code runs that code, so it is not allowed on a shared "
                              "link. Use the built-in rewards, or run the studio on your own machine.")
        rewards.append(Reward("code", code_reward(settings.reward_code), settings.code_weight))
    if not rewards:
        raise StudioError("GRPO needs at least one reward: set grpo.regex, answer_match, length_target_words, "
                          "json_weight, must_contain / must_not_contain, reward_run or reward_code.")
    return rewards


def reward_model_scorer(run_id: str, tokenizer, device: str) -> Callable:
    """Score (prompt, reply) pairs with a finished reward-model run (its base with a score head + adapter)."""
    import torch
    from peft import PeftModel

    from studio import models
    from studio.inference import base_location, check_usable
    from studio.rendering import render_text
    from studio.runs import open_run
    run = open_run(run_id)
    check_usable(run)
    if run.stored_status().stage != "reward":
        raise StudioError(f"grpo.reward_run {run_id!r} is not a reward-model run.")
    cfg = run.config()
    own_tokenizer = models.load_tokenizer(cfg.model, str(run.adapter_dir))
    base = models.load_model(base_location(cfg.model), device=device, head="score",
                             pad_token_id=own_tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()

    def score(prompts, completions, **_):
        texts = [render_text(own_tokenizer, [*p, {"role": "assistant", "content": text_of(c)}])
                 for p, c in zip(prompts, completions)]
        batch = own_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=1024)
        with torch.no_grad():
            return model(**batch.to(model.device)).logits[:, 0].float().tolist()
    return score
