"""Where the studio keeps its files, and the checks that keep writes inside those folders.

Everything lives under one data folder: ``$STUDIO_HOME`` if set, else ``~/.local/share/studio``.
The model cache can be moved on its own with ``$STUDIO_MODEL_CACHE`` (the tests share one cache
across many throwaway homes so the bundled model is converted only once).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from studio.errors import StudioError

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
ASSETS_DIR = REPO_ROOT / "assets"

# Run names become folder names and appear in shell commands people copy, so keep them boring.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def studio_home() -> Path:
    home = os.environ.get("STUDIO_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "studio")
    path = Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = studio_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_dir() -> Path:
    override = os.environ.get("STUDIO_MODEL_CACHE")
    path = Path(override).expanduser().resolve() if override else studio_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def uploads_dir() -> Path:
    path = studio_home() / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_safe_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape a folder or confuse a shell (``..``, ``/``, ``;``, spaces...)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise StudioError(
            f"The {what} {name!r} is not allowed. Use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no spaces, slashes or '..')."
        )
    return name


def is_within(path: Path, folder: Path) -> bool:
    """True when ``path`` (after resolving links and ``..``) lies inside ``folder``."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
