"""Adapter and merged-model folders that work away from this machine.

An adapter is only as portable as the name of its base: the run saved the base's place in the local model
cache, so ``adapter_config.json`` gets the hub id instead (the bundled model's is models.BUNDLED_HUB_ID; the studio
maps that id back to its local copy when it loads it). A merged model must end its replies where training taught
it to: its generation_config.json lists the end-of-turn token among its end tokens, and its chat template is the
one training rendered with (including the studio's choice about the template's default system prompt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from studio import models
from studio.config import BUNDLED_MODEL, ModelConfig
from studio.errors import StudioError
from studio.rendering import render_text, stop_token_ids
from studio.runs import Run

# Put in front of a template whose own default system prompt the studio left out of training (it rendered an empty
# system message instead): any other program rendering the exported template then renders what training saw.
EMPTY_SYSTEM_PREAMBLE = ("{%- if messages and messages[0]['role'] != 'system' %}"
                         "{%- set messages = [{'role': 'system', 'content': ''}] + messages %}{%- endif %}")
_MARK = "Zq9reply"  # plain letters: a template may strip or escape anything fancier


def base_hub_id(model_cfg: ModelConfig) -> tuple[str | None, str]:
    """(the hub id to name as the base, a note for the model card). None where there is no such id."""
    name = model_cfg.name_or_path
    if model_cfg.start_from:
        return None, (f"This run continued run {model_cfg.start_from}: its base is that run's merged model, which has "
                      "no hub id. Use the merged export (or GGUF), which needs no base.")
    if name in ("", BUNDLED_MODEL):
        return models.BUNDLED_HUB_ID, (
            f"Trained on the studio's bundled copy of {models.BUNDLED_HUB_ID} (its Q4_1 GGUF, dequantised). On the "
            "hub's full-precision weights the adapter behaves nearly, not exactly, as it did here.")
    if name.endswith(".gguf") or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None, (f"The base model was a local file or folder ({Path(name).name}), which has no hub id; give "
                      "the adapter that model, or use the merged export.")
    revision = f" at revision {model_cfg.revision}" if model_cfg.revision not in ("", "main") else ""
    return name, f"Base model: {name}{revision} on the Hugging Face hub."


def export_tokenizer(run: Run):
    """The tokenizer exactly as training used it (the run saved it beside the adapter)."""
    return models.load_tokenizer(run.config().model, str(run.adapter_dir))


def end_of_turn(tokenizer) -> tuple[int, str]:
    """The token that closes an assistant turn in this template (<|im_end|>, <|eot_id|>, ...): the first special
    token rendered after a reply. The end-of-sequence token where the template writes none."""
    text = render_text(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}])
    if _MARK in text:
        after = text[text.rindex(_MARK) + len(_MARK):]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        for tid in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if tid in special:
                return tid, tokenizer.convert_ids_to_tokens(tid)
    if tokenizer.eos_token_id is None:
        raise StudioError("The chat template closes a reply with no special token and the tokenizer has no "
                          "end-of-sequence token, so no exported model could know where a reply ends.")
    return tokenizer.eos_token_id, tokenizer.eos_token


def training_template(tokenizer) -> str:
    """The chat template as the studio rendered conversations in training. Where the studio left the template's
    own default system prompt out (model.template_system_prompt), the returned template does the same."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise StudioError("The run's tokenizer has no single chat template to export.")
    user = [{"role": "user", "content": "Hello"}]
    studio = render_text(tokenizer, user, add_generation_prompt=True)
    raw = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if studio == raw:
        return template
    wrapped = EMPTY_SYSTEM_PREAMBLE + template
    if tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                     chat_template=wrapped) == studio:
        return wrapped
    raise StudioError("The studio renders conversations differently from the model's chat template in a way the "
                      "export cannot write down; export with model.template_system_prompt 'keep'.")


def write_adapter(run: Run, folder: Path) -> dict:
    """Copy the adapter (a full fine-tune: the whole model) and name the base by hub id. Returns facts for the card."""
    shutil.copytree(run.adapter_dir, folder, dirs_exist_ok=True)
    hub_id, note = base_hub_id(run.config().model)
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if hub_id:
            config["base_model_name_or_path"] = hub_id
        else:  # a path on this machine means nothing elsewhere, and names a folder of the server
            config["base_model_name_or_path"] = None
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer = export_tokenizer(run)
    _write_template(tokenizer, folder)
    return {"base": hub_id, "base_note": note}


def merged_source(run: Run) -> Path:
    """The run's complete model folder: merged once (kept in the run), or the full fine-tune itself."""
    from studio.inference import merge_run
    if run.is_full_model():
        return run.adapter_dir
    if not (run.merged_dir / "config.json").is_file():
        merge_run(run)
    return run.merged_dir


def write_merged(run: Run, folder: Path) -> dict:
    """The complete model with the training tokenizer, template and end tokens. Returns facts for the card."""
    source = merged_source(run)
    shutil.copytree(source, folder, dirs_exist_ok=True)
    tokenizer = export_tokenizer(run)
    tokenizer.save_pretrained(str(folder))
    _write_template(tokenizer, folder)
    eot_id, eot = end_of_turn(tokenizer)
    ends = [eot_id] + [t for t in stop_token_ids(tokenizer) if t != eot_id]
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text(encoding="utf-8")) if generation_file.is_file() else {}
    generation["eos_token_id"] = ends
    if generation.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    generation_file.write_text(json.dumps(generation, indent=2), encoding="utf-8")
    hub_id, note = base_hub_id(run.config().model)
    return {"base": hub_id, "base_note": note, "end_of_turn": eot, "end_tokens": ends}


def _write_template(tokenizer, folder: Path) -> None:
    """chat_template.jinja: the template training rendered with (transformers reads it from there first)."""
    (folder / "chat_template.jinja").write_text(training_template(tokenizer), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():  # an older copy inside the config would otherwise be read by older transformers
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "chat_template" in config:
            config.pop("chat_template")
            config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
