"""An Ollama Modelfile for an exported GGUF: a Go TEMPLATE that writes what the training chat template wrote, and
PARAMETER stop lines for the end of a turn.

Ollama does not run Jinja, so the template is derived, not translated: the training template renders a
conversation of marker strings, and the text between the markers gives each role's prefix and suffix, the
assistant header that asks for a reply and any system message the template adds by itself. The pieces are then
put back together in Python the way the Go template puts them together, and compared with the training template's
own renders of several conversations; a template that does not fit this shape is reported, not guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from studio.errors import StudioError
from studio.rendering import render_text

_S, _U1, _A1, _U2 = "Zq9sys", "Zq9usrone", "Zq9astone", "Zq9usrtwo"


@dataclass
class TurnPieces:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    default_system: str | None  # the system block written when a conversation has none (None: nothing)
    lead: str = ""  # the BOS token's text where the template writes it first (Ollama's runtime adds BOS itself)

    def render(self, messages: list[dict]) -> str:
        """What the Go template below writes for `messages` (ending on a user turn), after the runtime's BOS."""
        out = self.lead
        if self.default_system is not None and not (messages and messages[0]["role"] == "system"):
            out += self.system_prefix + self.default_system + self.system_suffix
        for m in messages:
            role = m["role"]
            prefix, suffix = {"system": (self.system_prefix, self.system_suffix),
                              "user": (self.user_prefix, self.user_suffix),
                              "assistant": (self.assistant_prefix, self.assistant_suffix)}[role]
            out += prefix + m["content"] + suffix
        return out + self.assistant_prefix


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i:text.index(end, i)]


def derive_pieces(tokenizer) -> TurnPieces:
    """Each role's prefix and suffix from renders of marker conversations (see the module doc)."""
    def render(messages, generation=False):
        return render_text(tokenizer, messages, add_generation_prompt=generation)
    try:
        full = render([{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                       {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}])
        bare = render([{"role": "user", "content": _U1}], True)
        bos = tokenizer.bos_token or ""
        lead = bos if bos and "bos_token" in str(tokenizer.chat_template) and full.startswith(bos) and \
            bare.startswith(bos) else ""
        full, bare = full[len(lead):], bare[len(lead):]
        user_suffix = full[full.index(_U2) + len(_U2):]
        with_header = render([{"role": "system", "content": _S}, {"role": "user", "content": _U1}], True)
        assistant_prefix = with_header[with_header.index(_U1) + len(_U1) + len(user_suffix):]
        if not _between(full, _U1, _A1).startswith(user_suffix) or \
                _between(full, _U1, _A1)[len(user_suffix):] != assistant_prefix:
            raise ValueError("the assistant header differs between a reply and a request for one")
        system_then_user = _between(full, _S, _U1)
        # Most templates close every turn the same way; the user's prefix is what follows the system's close.
        if not system_then_user.startswith(user_suffix):
            raise ValueError("the system turn closes differently from a user turn")
        system_suffix = user_suffix
        user_prefix = system_then_user[len(system_suffix):]
        reply_then_user = _between(full, _A1, _U2)
        if not reply_then_user.endswith(user_prefix):
            raise ValueError("a user turn after a reply starts differently from the first")
        assistant_suffix = reply_then_user[:len(reply_then_user) - len(user_prefix)]
        system_prefix = full[:full.index(_S)]
        tail = user_prefix + _U1 + user_suffix + assistant_prefix
        if not bare.endswith(tail):
            raise ValueError("a conversation without a system message renders its user turn differently")
        added = bare[:len(bare) - len(tail)]
        default_system = None
        if added:
            if not (added.startswith(system_prefix) and added.endswith(system_suffix)):
                raise ValueError("the template adds text of its own that is not a system turn")
            default_system = added[len(system_prefix):len(added) - len(system_suffix)]
    except (ValueError, StudioError) as err:
        raise StudioError(f"The Ollama template could not be derived from this chat template ({err}); the GGUF "
                          "still carries the template itself for llama.cpp.") from None
    return TurnPieces(system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                      default_system, lead)


def check_pieces(pieces: TurnPieces, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Differences between the derived template and the training template on `conversations` (none: [])."""
    wrong = []
    for messages in conversations:
        ours = render_text(tokenizer, messages, add_generation_prompt=True)
        if pieces.render(messages) != ours:
            wrong.append(f"{len(messages)} message(s): Ollama would get {pieces.render(messages)[:200]!r}, training "
                         f"rendered {ours[:200]!r}")
    return wrong


def _go_text(text: str) -> str:
    """Literal text inside a Go template: '{{' would open an action."""
    return text.replace("{{", "{{ \"{{\" }}")


def go_template(pieces: TurnPieces) -> str:
    """The Go template for Ollama's TEMPLATE, on one line: trim markers ({{-) would also eat the pieces' newlines."""
    t = _go_text
    out = ""
    if pieces.default_system is not None:
        out += ('{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
                f"{t(pieces.system_prefix + pieces.default_system + pieces.system_suffix)}{{{{ end }}}}")
    out += ("{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{t(pieces.system_prefix)}{{{{ .Content }}}}{t(pieces.system_suffix)}'
            f'{{{{ else if eq .Role "user" }}}}{t(pieces.user_prefix)}{{{{ .Content }}}}{t(pieces.user_suffix)}'
            f'{{{{ else if eq .Role "assistant" }}}}{t(pieces.assistant_prefix)}{{{{ .Content }}}}'
            f"{t(pieces.assistant_suffix)}{{{{ end }}}}{{{{ end }}}}{t(pieces.assistant_prefix)}")
    return out


def stop_strings(tokenizer, pieces: TurnPieces | None, end_of_turn: str) -> list[str]:
    """The end of turn, the end of sequence, and the special token that opens a user turn (a model that starts
    writing the user's next turn has finished its own)."""
    stops = [end_of_turn]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    if pieces is not None:
        added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials = sorted(set(tokenizer.all_special_tokens) | added, key=len, reverse=True)
        for token in specials:
            if token and pieces.user_prefix.startswith(token) and token not in stops:
                stops.append(token)
                break
    return stops


def model_name(run_id: str, fmt: str) -> str:
    """A name `ollama create` accepts: lower case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", f"{run_id}-{fmt.removeprefix('gguf-')}".lower()).strip("-") or "studio-model"


def modelfile(gguf_name: str, name: str, template: str | None, stops: list[str], note: str = "") -> str:
    if template is not None and '"""' in template:
        raise StudioError('The chat template contains """, which a Modelfile cannot quote.')
    lines = [f"# Ollama: ollama create {name} -f Modelfile && ollama run {name}",
             f"# {note}" if note else "", f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    for stop in stops:
        escaped = stop.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(line for line in lines if line) + "\n"


def write_modelfile(folder, gguf_name: str, run_id: str, fmt: str, tokenizer, end_of_turn: str,
                    conversations: list[list[dict]]) -> dict:
    """Write `Modelfile` beside the GGUF; returns what was done, for the card and the page."""
    name = model_name(run_id, fmt)
    try:
        pieces = derive_pieces(tokenizer)
        wrong = check_pieces(pieces, tokenizer, conversations)
    except StudioError as err:
        pieces, wrong = None, [str(err)]
    template = go_template(pieces) if pieces is not None and not wrong else None
    note = "" if template else "No TEMPLATE: it could not be derived exactly (see export.json); Ollama will read " \
                               "the GGUF's own chat template instead."
    text = modelfile(gguf_name, name, template, stop_strings(tokenizer, pieces, end_of_turn), note)
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return {"name": name, "template_derived": template is not None, "problems": wrong,
            "commands": [f"ollama create {name} -f Modelfile", f"ollama run {name}"]}
