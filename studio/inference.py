"""Merge a run's adapter into its base, and chat with a base model, an adapter or a merged model.

Chat models are loaded fresh from disk (never the object being trained) and kept in a small cache so
a conversation does not reload weights on every message.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from studio import models
from studio.config import ModelConfig
from studio.errors import StudioError
from studio.records import ErrorKind
from studio.rendering import render_text, stop_token_ids
from studio.runs import Run, open_run

SOURCES = ("base", "adapter", "merged")


def check_usable(run: Run) -> None:
    """Refuse a run without weights worth serving: none saved yet, or trained into a NaN loss."""
    status = run.stored_status()
    if status.error_kind is ErrorKind.NON_FINITE_LOSS:
        raise StudioError(f"Run {run.id} ended with a NaN or infinite loss; its weights are not usable.")
    if not run.has_adapter():
        raise StudioError(f"Run {run.id} has no saved adapter yet (state: {status.state.value}). Wait for it to "
                          "finish or stop it; stopping saves the adapter.")


def base_location(model_cfg: ModelConfig) -> str:
    """Where a run's base model loads from: the model it names, or, when it starts from another run
    (model.start_from), that run's result with its adapter merged in (merged once, then kept in that run)."""
    if not model_cfg.start_from:
        return models.resolve(model_cfg.name_or_path, model_cfg.revision)
    start = open_run(model_cfg.start_from)
    check_usable(start)
    if start.stored_status().stage == "reward":
        raise StudioError(f"Run {start.id} is a reward model; a run can start only from one that writes replies.")
    if start.is_full_model():
        return str(start.adapter_dir)
    if not (start.merged_dir / "config.json").is_file():
        merge_run(start)
    return str(start.merged_dir)


def _head(run: Run) -> str:
    return "score" if run.stored_status().stage == "reward" else "causal_lm"


def merge_run(run_ref: str | Run) -> Run:
    """Write ``merged/``: the base with W' = W + BA folded in, loadable by plain from_pretrained."""
    from peft import PeftConfig, PeftModel
    run = run_ref if isinstance(run_ref, Run) else open_run(run_ref)
    check_usable(run)
    if run.is_full_model():
        raise StudioError(f"Run {run.id} fine-tuned the whole model, so there is nothing to merge: its adapter/ "
                          "folder already is a complete model.")
    peft_config = PeftConfig.from_pretrained(str(run.adapter_dir))
    if peft_config.is_prompt_learning:
        raise StudioError("Prompt and prefix tuning learn virtual tokens, which cannot be merged into weights. "
                          "Chat with the adapter instead.")
    cfg = run.config()
    device = models.pick_device()
    tokenizer = models.load_tokenizer(cfg.model, str(run.adapter_dir))
    base = models.load_model(base_location(cfg.model), dtype=_chat_dtype(device), device="cpu", head=_head(run),
                             pad_token_id=tokenizer.pad_token_id)
    merged = PeftModel.from_pretrained(base, str(run.adapter_dir)).merge_and_unload()
    tmp = run.path / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(run.merged_dir, ignore_errors=True)
    os.replace(tmp, run.merged_dir)
    return run


def _chat_dtype(device: str):
    import torch
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    label: str


def load_chat_model(source: str, run_ref: str | None = None, base: ModelConfig | None = None) -> ChatModel:
    """source: 'base' (a run's base model, or ``base``), 'adapter' or 'merged' (of run ``run_ref``)."""
    if source not in SOURCES:
        raise StudioError(f"Unknown chat source {source!r}; use one of {', '.join(SOURCES)}.")
    device = models.pick_device()
    dtype = _chat_dtype(device)
    run = open_run(run_ref) if run_ref else None
    if run is not None and _head(run) == "score":
        raise StudioError(f"Run {run.id} is a reward model: it scores replies rather than writing them. Use it as a "
                          "GRPO reward, or chat with the run it was trained for.")
    if source == "base" or run is None:
        model_cfg = base or (run.config().model if run else ModelConfig())
        location = base_location(model_cfg)
        tokenizer = models.load_tokenizer(model_cfg, location)
        model = models.load_model(location, dtype=dtype, device=device)
        label = f"run {model_cfg.start_from} (where this run started)" if model_cfg.start_from else \
            f"base: {model_cfg.name_or_path}"
        return ChatModel(model.eval(), tokenizer, label)
    check_usable(run)
    cfg = run.config()
    tokenizer = models.load_tokenizer(cfg.model, str(run.adapter_dir))
    if source == "merged" or run.is_full_model():
        folder = run.adapter_dir if run.is_full_model() else run.merged_dir
        if not (folder / "config.json").is_file():
            merge_run(run)
        model = models.load_model(str(folder), dtype=dtype, device=device)
        return ChatModel(model.eval(), tokenizer, f"{run.id} (merged)")
    from peft import PeftModel
    base_model = models.load_model(base_location(cfg.model), dtype=dtype, device=device)
    model = PeftModel.from_pretrained(base_model, str(run.adapter_dir))
    return ChatModel(model.eval(), tokenizer, f"{run.id} (adapter)")


class ChatModelCache:
    """Keeps the last few chat models in memory (base + tuned for side-by-side)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, ChatModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str, run_ref: str | None, base: ModelConfig | None = None) -> ChatModel:
        key = (source, run_ref, base.name_or_path if base else None)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        chat = load_chat_model(source, run_ref, base)
        with self._lock:
            self._items[key] = chat
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return chat

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def stream_reply(chat: ChatModel, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 0.9, max_seconds: float | None = None) -> Iterator[str]:
    """Yield the reply so far, growing token by token, through the model's chat template. `max_seconds`: the
    reply ends there, however long it is."""
    import torch
    from transformers import TextIteratorStreamer
    if not messages or messages[-1].get("role") != "user":
        raise StudioError("The conversation must end with a user message to get a reply.")
    prompt = render_text(chat.tokenizer, messages, add_generation_prompt=True)
    inputs = chat.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(chat.model.device)
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=int(max_new_tokens),
                  eos_token_id=stop_token_ids(chat.tokenizer), pad_token_id=chat.tokenizer.pad_token_id)
    if max_seconds:
        kwargs["max_time"] = float(max_seconds)
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False)
    errors: list[BaseException] = []

    def generate():
        try:
            with torch.inference_mode():
                chat.model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - reported to the reader below
            errors.append(err)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
    if errors:
        raise StudioError(f"Generation failed: {type(errors[0]).__name__}: {errors[0]}")


def reply(chat: ChatModel, prompt: str, **kwargs) -> str:
    text = ""
    for text in stream_reply(chat, [{"role": "user", "content": prompt}], **kwargs):
        pass
    return text.strip()
