"""Self-replay against forgetting: the starting model's own answers to a set of general prompts, made once per
model and kept, mixed into training at data.replay_share so the model goes on answering them as before.

The prompts (assets/replay/general_prompts.jsonl) are deliberately not those of the forgetting check
(assets/probe/general.jsonl): training on the check's own questions would make it report no forgetting whatever
happened to everything else.

Answers are cached under $STUDIO_HOME/cache/replay/, one file per model, template choice and prompt set: the
model runs only the first time. Generation is greedy, so the cached answers are what the model says by default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from studio.config import ModelConfig
from studio.errors import StudioError
from studio.paths import ASSETS_DIR, studio_home

PROMPTS = ASSETS_DIR / "replay" / "general_prompts.jsonl"
MAX_NEW_TOKENS = 160


def prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def cache_path(model: ModelConfig) -> Path:
    key = json.dumps([model.name_or_path, model.revision, model.chat_template, model.template_system_prompt,
                      model.start_from, PROMPTS.read_text(encoding="utf-8"), MAX_NEW_TOKENS])
    return studio_home() / "cache" / "replay" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def examples(model: ModelConfig, generate=None) -> list[dict]:
    """The replay conversations for `model`, from the cache or made now (and cached). `generate(prompts) ->
    replies` may stand in for the model (tests); by default the base model answers through studio.inference."""
    path = cache_path(model)
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    asked = prompts()
    replies = (generate or _generate_with(model))(asked)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r.strip()}]}
            for p, r in zip(asked, replies) if r and r.strip()]
    if not rows:
        raise StudioError("Self-replay: the starting model gave no answers to the general prompts; set "
                          "data.replay_share to 0.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # whole or not at all: a crash mid-write leaves no half cache
    return rows


def _generate_with(model: ModelConfig):
    def generate(asked: list[str]) -> list[str]:
        from studio import inference
        chat = inference.load_chat_model("base", base=model)
        return [inference.reply(chat, p, max_new_tokens=MAX_NEW_TOKENS) for p in asked]
    return generate
