"""Columns named differently from the formats the studio knows: mapped automatically when the meaning is plain.

Two steps, each only when it cannot be wrong about a column the person named themselves (data.columns is applied
first and always wins):
1. case: 'Instruction', 'MESSAGES', 'Text' are the known columns 'instruction', 'messages', 'text';
2. aliases, only when the columns do not already say a format: one prompt-like column (question, query, prompt,
   input...) and one reply-like column (answer, response, target...) become alpaca's instruction and output,
   'context' its input, 'system_prompt' its system.

The mapping found is returned so it can be shown and edited (the Data tab's column pickers).
"""

from __future__ import annotations

KNOWN = ("instruction", "input", "output", "system", "messages", "conversations", "text", "prompt", "completion",
         "chosen", "rejected", "tools", "history", "label", "kto_tag", "images", "videos", "audios", "answer",
         "question", "role", "replies", "id")
# In order of preference: the first one present is taken.
PROMPT_ALIASES = ("instruction", "question", "questions", "query", "prompt", "problem", "input", "inputs",
                  "user", "human", "source", "request")
REPLY_ALIASES = ("output", "answer", "answers", "response", "responses", "completion", "target", "targets",
                 "solution", "assistant", "gpt", "reply", "output_text", "label_text")
CONTEXT_ALIASES = ("context", "input")
SYSTEM_ALIASES = ("system", "system_prompt", "system_message")


def case_mapping(keys: set[str]) -> dict[str, str]:
    """Known column names written in another case -> the known name (when that name is not present already)."""
    return {k: k.lower() for k in keys if k != k.lower() and k.lower() in KNOWN and k.lower() not in keys}


def alias_mapping(keys: set[str]) -> dict[str, str]:
    """For rows whose columns say no format: {prompt column: 'instruction', reply column: 'output', ...}, or {}
    when there is not one prompt-like and one reply-like column."""
    by_lower = {k.lower(): k for k in keys}
    prompt = next((by_lower[a] for a in PROMPT_ALIASES if a in by_lower), None)
    reply = next((by_lower[a] for a in REPLY_ALIASES if a in by_lower and by_lower[a] != prompt), None)
    if prompt is None or reply is None:
        return {}
    mapping = {prompt: "instruction", reply: "output"}
    context = next((by_lower[a] for a in CONTEXT_ALIASES if a in by_lower and by_lower[a] not in mapping), None)
    if context is not None:
        mapping[context] = "input"
    system = next((by_lower[a] for a in SYSTEM_ALIASES if a in by_lower and by_lower[a] not in mapping), None)
    if system is not None:
        mapping[system] = "system"
    return {k: v for k, v in mapping.items() if k != v}
