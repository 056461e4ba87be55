"""What every studio process (the CLI, the page's server, a run's worker) sets before the libraries load.

Library progress bars, advice and warnings are noise to our users: our own lines say what is happening.

peft and trl import bitsandbytes as soon as it is installed, whatever the run needs. On a machine without an
NVIDIA driver that import only costs time and prints warnings about kernels it cannot load, on every command.
The studio uses bitsandbytes for QLoRA and 8-bit LoRA, which need CUDA anyway (models.bitsandbytes_config says so
in plain words), so a machine without one loses nothing when it is marked absent.
"""

from __future__ import annotations

import os
import shutil
import sys

CUDA_ONLY = ("bitsandbytes",)


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore")
    hide_cuda_only_libraries()


def nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def hide_cuda_only_libraries() -> None:
    """Mark the CUDA-only libraries as not installed in this process, unless the machine has an NVIDIA driver: an
    entry of None in sys.modules makes their import raise ImportError and importlib's find_spec answer None, which
    is how the libraries check for them. One already loaded stays."""
    if nvidia_driver_present():
        return
    for name in CUDA_ONLY:
        sys.modules.setdefault(name, None)
