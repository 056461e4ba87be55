"""Training: the trainer story (``trainer``), its callbacks, and the one run manager (``manager``)."""
