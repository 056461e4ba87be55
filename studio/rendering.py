"""Turn normalised conversations into token ids and labels through the model's chat template.

Labels are -100 on every token the model should not learn to produce (system and user turns, the
template's headers) unless ``train_on='all'``. Each assistant turn's closing marker (``<|im_end|>``,
``<|eot_id|>``, the EOS token...) is trained, so the tuned model learns to stop; this holds also when
the pad token is the EOS token, because padding is added later and separately from labels.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from studio.errors import StudioError
from studio.limits import Limits

IGNORE = -100

# Fallback templates for tokenizers that ship none. Each ends an assistant turn with the EOS token
# (unless the end-of-turn marker already is EOS) so that generation stops where training stopped.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' }}{% if message['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}"
        "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def apply_template_choice(tokenizer, choice: str) -> str:
    """Install the chosen chat template on the tokenizer; return which one is in use, for display."""
    if choice in ("", "auto"):
        if getattr(tokenizer, "chat_template", None):
            return "model's own"
        tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
        return "chatml (the model has none)"
    if choice in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[choice]
        return choice
    if "{%" not in choice and "{{" not in choice:
        raise StudioError(f"model.chat_template {choice!r} is neither 'auto', a built-in name "
                          f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template.")
    tokenizer.chat_template = choice
    return "custom"


def ensure_pad_token(tokenizer) -> None:
    # Batches need a pad id; reusing EOS is safe because labels are built before padding (see module doc).
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    unk = tokenizer.unk_token_id
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own TemplateError, templates raise_exception(...)
        raise StudioError(f"The chat template could not render a conversation ({err}). Pick another template "
                          "in model.chat_template (e.g. 'chatml').") from None


def _segments(tokenizer, example: dict, train_on: str) -> list[tuple[str, bool]]:
    """Split the rendered text into (text, trained) pieces, using prefix renders of the conversation."""
    if "text" in example:
        text = example["text"]
        if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token  # teach plain-text rows to end
        return [(text, True)]
    messages = example["messages"]
    full = render_text(tokenizer, messages)
    if train_on == "all":
        return [(full, True)]
    pieces, done = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_text(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prompt) or len(prompt) < done:
            # The template rewrites earlier turns (some strip reasoning from old replies); fall back to
            # training on the last reply only, which is always a clean suffix.
            prompt = render_text(tokenizer, messages[:-1], add_generation_prompt=True)
            if not full.startswith(prompt):
                return [(full, True)]
            return [(prompt, False), (full[len(prompt):], True)]
        pieces.append((full[done:len(prompt)], False))
        pieces.append((upto[len(prompt):], True))
        done = len(upto)
    pieces.append((full[done:], False))
    return [(t, trained) for t, trained in pieces if t]


def encode(tokenizer, example: dict, train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """Token ids and labels for one example (labels are -100 where the model is not trained)."""
    segments = _segments(tokenizer, example, train_on)
    text = "".join(t for t, _ in segments)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        trained_chars = bytearray(len(text))
        pos = 0
        for seg, trained in segments:
            if trained:
                trained_chars[pos:pos + len(seg)] = b"\x01" * len(seg)
            pos += len(seg)
        labels = []
        for tid, (start, end) in zip(ids, offsets):
            # A token is trained when it starts inside a trained span (special tokens have width > 0 too).
            inside = start < len(text) and trained_chars[start] == 1
            labels.append(tid if inside else IGNORE)
        return list(ids), labels
    ids, labels = [], []
    for seg, trained in segments:
        seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE] * len(seg_ids)
    return ids, labels


@dataclass
class EncodedSet:
    rows: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    lengths: list[int] = field(default_factory=list)  # before truncation
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_nothing_to_learn: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for x in r["labels"] if x != IGNORE) for r in self.rows)

    def summary(self) -> str:
        parts = [f"{len(self.rows)} rows"]
        if self.truncated:
            parts.append(f"{self.truncated} cut to max_length")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as too long")
        if self.dropped_nothing_to_learn:
            parts.append(f"{self.dropped_nothing_to_learn} dropped because max_length left no reply to learn")
        return ", ".join(parts)


def encode_all(tokenizer, examples: list[dict], max_length: int, train_on: str = "assistant",
               too_long: str = "truncate", should_stop=None) -> EncodedSet:
    """Encode, then apply the too-long policy; rows left with nothing to learn are dropped and counted
    (a row whose labels are all -100 would give a NaN or zero loss). `should_stop`: asked every 64 rows; when
    it says yes, encoding ends early with the rows so far (a Stop during a long encode is heard)."""
    out = EncodedSet()
    limits = Limits.from_env()
    seconds = limits.template_seconds if limits is not None else None
    for number, example in enumerate(examples):
        if should_stop is not None and number % 64 == 0 and should_stop():
            break
        try:
            with time_bound(seconds):
                ids, labels = encode(tokenizer, example, train_on)
        except _TimeUp:
            raise StudioError(f"Turning conversation {number + 1} into text took the chat template more than "
                              f"{seconds:g} s, the limit here. Use model.chat_template 'auto' or a built-in one "
                              "(chatml, llama3, alpaca).") from None
        out.lengths.append(len(ids))
        if len(ids) > max_length:
            if too_long == "drop":
                out.dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(x == IGNORE for x in labels):
            out.dropped_nothing_to_learn += 1
            continue
        out.rows.append({"input_ids": ids, "labels": labels})
    return out


class _TimeUp(BaseException):
    """Not an Exception: the template's own error handling (render_text) must not swallow it."""


@contextmanager
def time_bound(seconds: float | None):
    """Raise _TimeUp in the code inside once `seconds` have passed (main thread only: it uses SIGALRM; elsewhere,
    and without `seconds`, no bound)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TimeUp
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def token_preview(tokenizer, example: dict, train_on: str = "assistant") -> list[tuple[str, bool]]:
    """The example exactly as the model sees it: (token text, trained?) pairs, for colouring in the UI."""
    ids, labels = encode(tokenizer, example, train_on)
    return [(tokenizer.decode([tid]), lab != IGNORE) for tid, lab in zip(ids, labels)]
