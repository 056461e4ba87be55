"""Presets are YAML files whose keys are exactly the config fields (see ``studio.config``).

``presets/*.yaml`` are whole runs (``demo.yaml``); ``presets/models/*.yaml`` describe a base model
with its chat template and LoRA settings, and are merged under a run's own settings.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from studio.config import RunConfig, from_dict, set_value, to_dict
from studio.errors import StudioError
from studio.paths import PRESETS_DIR, check_safe_name


class _NoAliases(yaml.SafeLoader):
    """YAML without aliases (*name): settings never need them, and a few bytes of nested aliases expand into
    megabytes of config."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}")
        return super().compose_node(parent, index)


class _AliasFound(yaml.YAMLError):
    pass


def load_yaml(text: str, source: str):
    """Parse YAML settings (no Python tags, no aliases); StudioError naming `source` for anything else."""
    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass
    except _AliasFound as err:
        raise StudioError(f"{source}: {err}; settings files do not allow aliases, write the value out.") from None
    except yaml.YAMLError as err:
        raise StudioError(f"{source} is not valid YAML: {err}. Fix the indentation or quoting on that line.") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"Preset file {path} does not exist. Check the path, or pick one from {PRESETS_DIR}.")
    data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StudioError(f"{path} must hold 'key: value' settings at the top level, not a {type(data).__name__}.")
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run preset, apply ``section.field=value`` overrides, and validate."""
    data = read_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise StudioError(f"--set {item!r} needs the form section.field=value, e.g. training.epochs=2.")
        key, raw = item.split("=", 1)
        set_value(data, key.strip(), load_yaml(raw, f"--set {key.strip()}") if raw.strip() else "")
    return from_dict(data, source=str(path))


def model_presets() -> dict[str, dict]:
    """Model presets by name (file stem), each a partial config dict with a 'label' for menus."""
    presets = {}
    for path in sorted((PRESETS_DIR / "models").glob("*.yaml")):
        data = read_yaml(path)
        label = data.pop("label", path.stem)
        from_dict(data, source=str(path))  # refuse a broken preset early, naming its file
        presets[path.stem] = {"label": label, **data}
    return presets


def run_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def save_run_preset(cfg: RunConfig, name: str, folder: Path) -> Path:
    check_safe_name(name, "preset name")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
