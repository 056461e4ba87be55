"""The Gradio UI: one module per tab, assembled in ``app``. Lays out components and calls
``studio.service.Studio``; imports no torch, trl or peft."""
