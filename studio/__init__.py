"""Fine-tuning studio: a headless engine (this package) with a Gradio UI on top (``studio.ui``)."""

import os

__version__ = "0.1.0"

# OpenMP's idle threads sleep instead of spinning. On a small CPU the studio's processes share the cores (the page's
# server, a training worker, two chat models answering at once, a browser); spinning threads then take the cores
# from the ones with work, and a 2-core machine ran PyTorch's operators several times slower (bench/NOTES.md).
# Set before anything imports torch: OpenMP reads it once, when it starts; a value the person set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
