"""The studio's speed path: ``plan`` decides (no torch), ``probe`` finds the facts it decides on, ``apply`` is
the one place a plan acts; the rest are the kernels and the trainer it may use."""
