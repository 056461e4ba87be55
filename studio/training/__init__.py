"""Training inside a run's worker process: the worker (``worker``), the trainer story every trainer-based
stage shares (``loop``), its callbacks, and the fast path (``fast/``: the plan, and the one place it acts)."""
