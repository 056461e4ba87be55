"""Fine-tuning studio: a headless engine (this package) with a Gradio UI on top (``studio.ui``)."""

__version__ = "0.1.0"
