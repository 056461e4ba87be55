"""The run manager: the one owner of the background training thread.

One run trains at a time. ``start`` returns at once with the new run; a second ``start`` while one is
active raises BusyError straight away (it never queues behind it silently). The thread keeps going
whatever happens to the browser or the caller; state lives in the run folder, so a new manager after
a restart marks cut-off runs ``interrupted`` and can resume them.
"""

from __future__ import annotations

import threading

from studio.config import RunConfig
from studio.errors import BusyError, StudioError
from studio.runs import ACTIVE_STATES, Run, checkpoint_step, mark_interrupted_runs, new_run, open_run


class RunManager:
    def __init__(self, mark_interrupted: bool = True):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._run: Run | None = None
        self._owner: str | None = None
        if mark_interrupted:
            mark_interrupted_runs()

    # --- queries ---
    @property
    def active_run(self) -> Run | None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self._run
            return None

    def snapshot(self, run_id: str | None = None) -> dict:
        """Status plus metrics so far for a run (default: the active one, else none)."""
        run = open_run(run_id) if run_id else self.active_run
        if run is None:
            return {"run_id": None, "status": {"state": "idle", "message": "No run is training."}, "metrics": []}
        return {"run_id": run.id, "status": run.status(), "metrics": run.metrics()}

    # --- actions ---
    def start(self, cfg: RunConfig, owner: str | None = None) -> Run:
        cfg.validate()
        with self._lock:
            self._ensure_idle()
            run = new_run(cfg)
            self._launch(run, resume=False, owner=owner)
            return run

    def resume(self, run_id: str, owner: str | None = None) -> Run:
        run = open_run(run_id)
        state = run.status().get("state")
        if state not in ("interrupted", "failed", "completed"):
            raise StudioError(f"Run {run.id} is {state}; only interrupted, failed or stopped runs can resume.")
        checkpoint = run.last_checkpoint()
        if checkpoint is None:
            raise StudioError(f"Run {run.id} has no complete checkpoint to resume from. Start it again instead.")
        with self._lock:
            self._ensure_idle()
            # Forget now the steps after the checkpoint, so the plot never shows them while the model loads.
            run.truncate_metrics_after(checkpoint_step(checkpoint))
            run.set_status("queued", "Resuming from the last checkpoint.")
            self._launch(run, resume=True, owner=owner)
            return run

    def stop(self, owner: str | None = None) -> str:
        """Ask the active run to stop after its current step. Safe to call twice or when idle."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            if not alive or self._run is None:
                return "No run is training, so there is nothing to stop."
            if owner is not None and self._owner is not None and owner != self._owner:
                raise StudioError("This run was started by someone else; only they can stop it.")
            if self._stop.is_set():
                return f"Run {self._run.id} is already stopping."
            self._stop.set()
            if self._run.status().get("state") in ACTIVE_STATES:
                self._run.set_status("stopping", "Stopping after the current step, then saving the adapter.")
            return f"Stopping run {self._run.id} after the current step."

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the active run's thread ends; True if it ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # --- internals ---
    def _ensure_idle(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise BusyError(f"A run is already training ({self._run.id if self._run else '?'}). Only one run trains "
                            "at a time: wait for it to finish, or stop it first.")

    def _launch(self, run: Run, resume: bool, owner: str | None) -> None:
        from studio.training.trainer import train_run
        self._stop = threading.Event()
        self._run, self._owner = run, owner
        stop = self._stop
        self._thread = threading.Thread(target=train_run, args=(run, stop, resume), name=f"train-{run.id}",
                                        daemon=True)
        self._thread.start()
