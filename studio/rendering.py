"""Turn normalised conversations into token ids and labels through the model's chat template.

Labels are -100 on every token the model should not learn to produce (system and user turns, the
template's headers) unless ``train_on='all'``. Each assistant turn's closing marker (``<|im_end|>``,
``<|eot_id|>``, the EOS token...) is trained, so the tuned model learns to stop; this holds also when
the pad token is the EOS token, because padding is added later and separately from labels.

Tool calls are trained (they are the assistant's turns), tool results are not. ``tools`` go to the template's
own tool support (``apply_chat_template(..., tools=...)``); a template without it gets the documented fallback
(``tool_fallback``): the tools described in the system message and calls/results written as Hermes-style
``<tool_call>``/``<tool_response>`` text, which any template can render. Reasoning goes in ``reasoning_content``
where the template reads it, else before the reply inside ``<think>...</think>``. A turn marked ``"train": False``
(a loss weight of 0) is rendered but not learned. Plain-text rows longer than max_length are split into blocks
of max_length tokens, each trained in full, so continued pretraining loses no text.

A template that adds its own default system prompt to conversations without one (SmolLM2, Qwen2.5) gets an empty
system message instead, unless the tokenizer's system choice is 'keep' (``set_system_choice``; the model
section's template_system_prompt), in training and in chat alike.
"""

from __future__ import annotations

import json
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


SYSTEM_CHOICE = "studio_template_system_prompt"  # the tokenizer attribute that holds the choice
_PROBE = "\x02studio-probe\x03"
_defaults: dict[str, str] = {}


def set_system_choice(tokenizer, choice: str) -> None:
    """'leave_out' (the template's own default system prompt is replaced by an empty one) or 'keep'."""
    setattr(tokenizer, SYSTEM_CHOICE, choice)


def template_default_system(tokenizer) -> str:
    """The system text the template adds to a conversation that has none ('' when it adds nothing): the
    conversation rendered with no system message, compared with the same one under a probe system message."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or template in _defaults:
        return _defaults.get(template, "") if isinstance(template, str) else ""
    user = [{"role": "user", "content": "hello"}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        probed = tokenizer.apply_chat_template([{"role": "system", "content": _PROBE}, *user], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no default we could find
        bare, probed = "", ""
    found = ""
    if _PROBE in probed:
        before, after = probed.split(_PROBE, 1)
        if bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
            found = bare[len(before):len(bare) - len(after)]
    _defaults[template] = found
    return found


def supports(tokenizer, feature: str) -> bool:
    """Whether the chat template reads `feature` ('tool_calls', 'reasoning_content'): it names it."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and feature in template


def prepare(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[list[dict], list | None]:
    """The messages and tools as this template gets them: the system choice applied, tools and reasoning
    written for templates that do not read them, and the studio's own keys removed."""
    if (messages and messages[0]["role"] != "system" and getattr(tokenizer, SYSTEM_CHOICE, "leave_out") != "keep"
            and template_default_system(tokenizer)):
        messages = [{"role": "system", "content": ""}, *messages]
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and not supports(tokenizer, "tool_calls"):
        messages, tools = tool_fallback(messages, tools), None
    if any(m.get("reasoning_content") for m in messages) and not supports(tokenizer, "reasoning_content"):
        messages = [_think_inline(m) if m.get("reasoning_content") else m for m in messages]
    return [{k: v for k, v in m.items() if k != "train"} for m in messages], tools or None


def _think_inline(message: dict) -> dict:
    content = f"<think>\n{message['reasoning_content']}\n</think>\n\n{message['content']}"
    return {k: v for k, v in {**message, "content": content}.items() if k != "reasoning_content"}


def tool_fallback(messages: list[dict], tools: list | None) -> list[dict]:
    """Tool use written as plain text for a template without tool support (Hermes/Qwen style): the tools in the
    system message, each call as <tool_call>{json}</tool_call> in the assistant's reply, each result as a user
    turn <tool_response>...</tool_response> (consecutive results in one turn)."""
    out: list[dict] = []
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        text = ("You may call one or more of these tools. For each call, reply with "
                "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.\n<tools>\n" + listing + "\n</tools>")
        if messages and messages[0]["role"] == "system":
            first = messages[0]
            out.append({**first, "content": (first["content"] + "\n\n" + text).strip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": text})
    for message in messages:
        if message["role"] == "tool":
            piece = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + piece}
            else:
                out.append({"role": "user", "content": piece, "_results": True})
            continue
        if message.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                             "arguments": c["function"]["arguments"]},
                                                            ensure_ascii=False) + "\n</tool_call>"
                              for c in message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message["content"].strip() else calls
            message = {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}
        out.append(message)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                prepared: bool = False) -> str:
    """The conversation as text through the chat template (with the system choice and tool handling of
    `prepare`, unless the messages are `prepared` already)."""
    if not prepared:
        messages, tools = prepare(tokenizer, messages, tools)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own TemplateError, templates raise_exception(...)
        raise StudioError(f"The chat template could not render a conversation ({err}). Pick another template "
                          "in model.chat_template (e.g. 'chatml').") from None


def reply_prompt(tokenizer, conversation: list[dict] | dict) -> str:
    """The text a model continues to reply to `conversation`: a list of turns ending on the user, or a row as read
    ({"messages": [...], "tools": [...]}), whose tools the template is given, so a tool-calling prompt is asked
    the way it was trained."""
    if isinstance(conversation, dict):
        return render_text(tokenizer, conversation["messages"], add_generation_prompt=True,
                           tools=conversation.get("tools"))
    return render_text(tokenizer, conversation, add_generation_prompt=True)


def _segments(tokenizer, example: dict, train_on: str) -> list[tuple[str, bool]]:
    """Split the rendered text into (text, trained) pieces, using prefix renders of the conversation."""
    if "text" in example:
        text = example["text"]
        if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token  # teach plain-text rows to end
        return [(text, True)]
    messages, tools = prepare(tokenizer, example["messages"], example.get("tools"))
    # prepare may add a system turn and merge tool results: each prepared turn's train flag comes from its original.
    trained_turns = [m.get("train", True) for m in _align(example["messages"], messages)]

    def render(turns, generation=False):
        return render_text(tokenizer, turns, add_generation_prompt=generation, tools=tools, prepared=True)
    full = render(messages)
    if train_on == "all":
        return [(full, True)]
    pieces, done = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or not trained_turns[i]:
            continue  # a turn with loss weight 0 stays context, like the user's
        prompt = render(messages[:i], generation=True)
        upto = render(messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prompt) or len(prompt) < done:
            # The template rewrites earlier turns (some strip reasoning from old replies); fall back to
            # training on the last reply only, which is always a clean suffix.
            prompt = render(messages[:-1], generation=True)
            if not full.startswith(prompt) or not trained_turns[-1]:
                return [(full, True)] if trained_turns[-1] else [(full, False)]
            return [(prompt, False), (full[len(prompt):], True)]
        pieces.append((full[done:len(prompt)], False))
        pieces.append((upto[len(prompt):], True))
        done = len(upto)
    pieces.append((full[done:], False))
    return [(t, trained) for t, trained in pieces if t]


def _align(original: list[dict], prepared: list[dict]) -> list[dict]:
    """The original turn behind each prepared one, for the per-turn train flags (prepare may add a system turn
    in front and merge consecutive tool results into one; assistant turns keep their order)."""
    replies = iter([m for m in original if m["role"] == "assistant"])
    return [next(replies, {}) if m["role"] == "assistant" else {} for m in prepared]


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
    split_into_blocks: int = 0  # plain-text rows longer than max_length, split (none of their text is lost)

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
        if self.split_into_blocks:
            parts.append(f"{self.split_into_blocks} plain-text rows split into blocks of max_length")
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
        if len(ids) > max_length and "text" in example:
            # Plain text has no reply to cut off: every block of max_length tokens is trained.
            out.split_into_blocks += 1
            out.rows += [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
                         for i in range(0, len(ids), max_length)]
            continue
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
    """The example exactly as the model sees it: (text, trained?) spans, for colouring in the UI. Each run of
    tokens with the same flag is decoded together, so a character split across byte tokens shows whole."""
    ids, labels = encode(tokenizer, example, train_on)
    spans: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            spans.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE))
            start = i
    return spans
