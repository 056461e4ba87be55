"""The training slot: one run trains at a time on this machine, whichever process started it.

The slot is ``<studio home>/training.lock``. Starting a run takes an exclusive ``flock`` on it and hands the
open file to the worker process, so the lock lives exactly as long as the worker: it is released by the
kernel however the worker ends (finished, failed, ``kill -9``), and a lock left behind by a dead process can
never block anyone. The file's text names the run and the process holding it (its pid and start time, so a
recycled pid is not taken for the worker): readers look there and never touch the lock itself, which keeps
a status query from ever making a concurrent start fail.

POSIX only (``fcntl``), like the rest of the launcher.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from studio.errors import BusyError
from studio.paths import studio_home

LOCK_NAME = "training.lock"
STARTING = ""  # the run id in the lock while a new run's folder is being made


def lock_path() -> Path:
    return studio_home() / LOCK_NAME


def process_start(pid: int) -> str | None:
    """An identity for a live process that a recycled pid would not share (Linux: its start time in clock
    ticks since boot); "" where the system does not tell; None when no such process is running."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return None
        fields_after_name = text.rsplit(")", 1)[-1].split()
        if fields_after_name[0] in ("Z", "X"):  # exited, not yet reaped by its parent: not running
            return None
        return fields_after_name[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def is_running(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs (and, when `started` is known, is the same process as then)."""
    now = process_start(pid)
    return now is not None and (not started or not now or now == started)


@dataclass
class Holder:
    run_id: str
    pid: int
    started: str = ""


def holder() -> Holder | None:
    """Who holds the slot now, from the lock file's text; None when it is free."""
    try:
        data = json.loads(lock_path().read_text(encoding="utf-8"))
        found = Holder(run_id=str(data["run_id"]), pid=int(data["pid"]), started=str(data.get("started", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if is_running(found.pid, found.started) else None


class Claim:
    """The slot, taken. ``hand_over`` gives it to the worker process that inherited ``fd``; ``release``
    gives it back (a start that failed before any worker ran)."""

    def __init__(self, fd: int, run_id: str):
        self.fd, self.run_id = fd, run_id
        self._write(os.getpid())

    def _write(self, pid: int) -> None:
        text = json.dumps({"run_id": self.run_id, "pid": pid, "started": process_start(pid) or ""})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def rename(self, run_id: str) -> None:
        """The run's final id (made unique once its folder exists)."""
        self.run_id = run_id
        self._write(os.getpid())

    def hand_over(self, pid: int) -> None:
        """The worker `pid` holds the lock now (it inherited the descriptor); this process lets go of it."""
        self._write(pid)
        os.close(self.fd)
        self.fd = -1

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def claim(run_id: str) -> Claim:
    """Take the slot for `run_id`, or raise BusyError at once naming the run that holds it."""
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        busy = holder()
        name = busy.run_id if busy and busy.run_id != STARTING else "another run"
        raise BusyError(f"busy: {name} is training. Only one run trains at a time: wait for it to finish, or "
                        "stop it first.") from None
    return Claim(fd, run_id)
