"""Load a written GGUF back with llama.cpp (llama-cpp-python) and check it does what training taught.

Four checks, each a plain sentence of what was compared:
  template   a held-out conversation through the GGUF's own chat template (rendered as llama-cpp-python renders
             it) is the very text the studio rendered in training
  tokens     llama.cpp's tokenizer turns that text into the same ids as the training tokenizer
  stops      greedy generation, stopped only at the end tokens the GGUF declares (eos, eot), ends at the
             template's end-of-turn token. Runtimes that trust the metadata alone (Ollama's own engine, for one)
             stop exactly there; llama.cpp also guesses end tokens from their names, which this check does not rely
             on, so a file with a wrong end token fails here even where llama.cpp would hide it
  reply      f16: the greedy reply is token for token the merged transformers model's; bf16 and q8_0: fed that reply,
             the GGUF ranks the same next token first at 90% of its positions or more (8-bit rounding moves a small
             model's greedy path after a few tokens, so token-for-token would fail sound files)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from studio.rendering import render_text


@dataclass
class Check:
    name: str
    passed: bool | None  # None: shown, not checked
    detail: str

    def to_json(self) -> dict:
        return asdict(self)


def _greedy_gguf(llm, prompt_ids: list[int], stops: set[int], max_new: int) -> tuple[list[int], int | None]:
    """Greedy token ids after the prompt, and the end token it stopped on (None: it ran to max_new)."""
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token in stops:
            return out, token
        out.append(token)
        if len(out) >= max_new:
            return out, None
    return out, None


def _greedy_transformers(model_dir: Path, tokenizer, prompt: str, max_new: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from studio.rendering import stop_token_ids
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    stops = stop_token_ids(tokenizer)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id)
    ids = generated[0, inputs["input_ids"].shape[1]:].tolist()
    while ids and ids[-1] in stops:
        ids.pop()
    return ids


AGREEMENT = 0.9


def _agreement(llm, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """Share of the reply's tokens that the GGUF, fed the prompt and the reply so far, ranks first."""
    import numpy as np
    llm.reset()
    llm.eval(prompt_ids + reply_ids)
    scores = np.asarray(llm.scores[len(prompt_ids) - 1:len(prompt_ids) + len(reply_ids) - 1])
    return float((scores.argmax(axis=1) == np.asarray(reply_ids)).mean()) if reply_ids else 1.0


def verify_gguf(path: Path, tokenizer, end_of_turn_id: int, conversations: list[list[dict]],
                merged_dir: Path | None = None, max_new: int = 160, compare: str = "exact") -> list[Check]:
    """The checks above on `path`. `conversations`: held-out ones, each ending on a user turn (the first is the one
    generated from); `merged_dir`: compare the reply with this transformers model's (None: no reply check), `compare`
    'exact' (token for token) or 'agreement' (the GGUF's own next-token choices along the merged model's reply)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # logits_all: the agreement check reads the GGUF's choice at every position of a reply (n_ctx bounds that
    # buffer: 1024 positions x the vocabulary, 200 MB for a 49k vocabulary).
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=max(1, os.cpu_count() or 1), verbose=False,
                logits_all=compare == "agreement")
    meta = llm.metadata
    checks: list[Check] = []

    def text_of(key: str) -> str:
        tid = meta.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

    template = meta.get("tokenizer.chat_template")
    prompt = render_text(tokenizer, conversations[0], add_generation_prompt=True)
    if not template:
        checks.append(Check("template", False, "The GGUF holds no chat template (tokenizer.chat_template)."))
    else:
        formatter = Jinja2ChatFormatter(template, eos_token=text_of("tokenizer.ggml.eos_token_id"),
                                        bos_token=text_of("tokenizer.ggml.bos_token_id"), add_generation_prompt=True)
        wrong = []
        for messages in conversations:
            theirs = formatter(messages=messages).prompt
            ours = render_text(tokenizer, messages, add_generation_prompt=True)
            if theirs != ours:
                wrong.append(f"{len(messages)} message(s): the GGUF's template gives {theirs[:300]!r}, training "
                             f"rendered {ours[:300]!r}")
        checks.append(Check("template", not wrong, "; ".join(wrong) or
                            f"{len(conversations)} held-out conversation(s) through the GGUF's own chat template "
                            "render exactly as in training"))

    theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    ours_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    same = list(theirs_ids) == list(ours_ids)
    checks.append(Check("tokens", same, f"the prompt is the same {len(ours_ids)} token ids in llama.cpp and in "
                                        "training" if same else
                        f"llama.cpp reads the prompt as {len(theirs_ids)} tokens, training as {len(ours_ids)}"))

    declared = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}
    eot_text = tokenizer.convert_ids_to_tokens(end_of_turn_id)
    reply_ids, ended_on = _greedy_gguf(llm, list(ours_ids), declared, max_new)
    if ended_on == end_of_turn_id:
        checks.append(Check("stops", True, f"greedy generation ended its turn at {eot_text} after {len(reply_ids)} "
                                           f"tokens; the GGUF declares it as an end token"))
    elif ended_on is not None:
        checks.append(Check("stops", False, f"generation stopped at {llm.detokenize([ended_on], special=True)!r}, "
                                            f"not at the end of turn {eot_text}"))
    else:
        wrote = f" It wrote {eot_text} at token {reply_ids.index(end_of_turn_id) + 1}, which the GGUF does not " \
                f"declare as an end token (declared: {sorted(declared)})." if end_of_turn_id in reply_ids else ""
        checks.append(Check("stops", False, f"generation did not stop within {max_new} tokens.{wrote}"))

    if merged_dir is not None:
        expected = _greedy_transformers(merged_dir, tokenizer, prompt, max_new)
        mine = tokenizer.decode(reply_ids, skip_special_tokens=True)
        theirs = tokenizer.decode(expected, skip_special_tokens=True)
        if compare == "exact":
            same_reply = reply_ids == expected
            checks.append(Check("reply", same_reply, f"the greedy reply is the merged model's, token for token: "
                                f"{mine!r}" if same_reply else
                                f"the GGUF replied {mine!r}, the merged model {theirs!r}"))
        else:
            rate = _agreement(llm, list(ours_ids), expected + [end_of_turn_id])
            checks.append(Check("reply", rate >= AGREEMENT, f"fed the merged model's reply ({len(expected) + 1} "
                                f"tokens, its end included), the GGUF picks the same next token at {rate:.0%} of "
                                f"positions (needed: {AGREEMENT:.0%}); its own greedy reply: {mine!r}"))
    else:
        checks.append(Check("reply", None, "not compared with the merged model's (4-bit rounding changes replies): "
                            f"{tokenizer.decode(reply_ids, skip_special_tokens=True)!r}"))
    if hasattr(llm, "close"):
        llm.close()
    return checks
