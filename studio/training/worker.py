"""The worker process: ``python -m studio.training.worker RUN_DIR [--resume]``.

Every run, from the page, the API or the CLI, is this process on its run folder, started by
``studio.launcher``. It reads the run's config, runs its stage, and writes the status, metrics and results
into the folder, which is all the page and the CLI read. It never leaves a run looking alive when it is
not: whatever goes wrong, from a library that fails to import to running out of memory, ends the run as
``failed`` with a message that says what to do. SIGTERM and SIGINT ask for a graceful stop (the same as the
page's Stop, which is a ``stop-request`` file it checks every step); a second one stops at once, leaving the
run resumable from its last checkpoint.

Only the standard library is imported before the run's status can be written, so even a broken install
reaches the page as a failure with its message.

``python -m studio.training.worker --spare FD`` is a spare worker the page's server keeps ready: it imports
the training libraries (about 10 s on a 2-core CPU) before anyone presses Start, then waits on the socket FD
for a run folder and the training slot's lock, and from there is the worker of that run. It ends when the
socket closes (its server is gone).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from studio.quiet import quiet_libraries


class _Signals:
    """The first SIGTERM or SIGINT asks for a stop; the second one interrupts at once."""

    def __init__(self):
        self.count = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m studio.training.worker RUN_DIR [--resume] | --spare FD", file=sys.stderr)
        return 2
    if args[0] == "--spare":
        job = _wait_as_spare(int(args[1]))
        if job is None:
            return 0
        args = job
    run_dir, resume = Path(args[0]), "--resume" in args[1:]
    signals = _Signals()
    signals.install()
    quiet_libraries()
    try:
        from studio.distributed import world
        from studio.records import State
        from studio.runs import PeerRun, Run
    except BaseException as err:  # noqa: BLE001 - the studio itself cannot be imported: say so in the folder
        _write_bare_failure(run_dir, err)
        return 1
    where = world()
    if where.distributed:
        _join_world(run_dir, where)
    run = Run(run_dir) if where.keeps_records else PeerRun(run_dir)
    status = execute(run, resume, lambda: signals.count > 0 or run.stop_requested())
    return 0 if status.state is State.COMPLETED else 1


def _join_world(run_dir: Path, where) -> None:
    """One process of a distributed run (torchrun set its rank): it ends with torchrun's agent, leaves its pid for
    whoever must end it, and trains on its own GPU."""
    from studio import distributed
    distributed.end_with_parent()
    distributed.note_rank(run_dir, where)
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(where.local_rank)


def _wait_as_spare(fd: int) -> list[str] | None:
    """Import what training needs, then wait for a job: (worker arguments, the slot's lock). From then on this
    process's output goes to the run's worker.log. None when the server closed the socket instead."""
    import socket
    channel = socket.socket(fileno=fd)
    quiet_libraries()
    try:
        import studio.stages.sft  # noqa: F401
        import studio.training.loop  # noqa: F401
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    except BaseException:  # noqa: BLE001 - the run this spare takes will import again and report it
        pass
    print(f"spare worker {os.getpid()} ready", flush=True)
    try:
        message, fds, _, _ = socket.recv_fds(channel, 4096, 1)
    except OSError:
        return None
    if not message:
        return None
    job = json.loads(message.decode())
    log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    channel.send(b"taken")  # the slot's lock is held here now (fds[0]): the launcher may let go of its copy
    channel.close()
    return job["args"]


def execute(run, resume: bool = False, stop_requested=None):
    """Run the stage the run's config names, in this process, to the end; return the final status. The
    worker's main calls this; tests and the benchmark may call it directly."""
    from studio.records import ErrorKind, State
    from studio.stages import Job, StoppedBeforeStart
    stop_requested = stop_requested or run.stop_requested
    try:
        run.update_status(state=State.RUNNING, message="Loading data and model.", error="",
                          error_kind=ErrorKind.NONE, stopped_early=False, worker_pid=os.getpid())
        cfg = run.config()
        from studio import stages
        outcome = stages.get(cfg.stage).run(Job(run, cfg, resume, stop_requested))
        return run.update_status(state=State.COMPLETED, message=outcome.message, stopped_early=outcome.stopped_early,
                                 step=outcome.step or run.stored_status().step)
    except StoppedBeforeStart:
        return run.update_status(state=State.COMPLETED, message="Stopped before the first step; nothing was trained.",
                                 stopped_early=True)
    except BaseException as err:  # noqa: BLE001 - the run must end in a readable state whatever happened
        return _record_failure(run, err)


def _record_failure(run, err: BaseException):
    from studio.distributed import world
    where = world()
    if not where.distributed:
        return _record_failure_of_one(run, err)
    from studio import distributed
    if not isinstance(err, KeyboardInterrupt):
        distributed.note_rank_failure(run.path, where, _plain_error(err))
    if not run.keeps_records:
        return run.stored_status()
    if not _lost_a_peer(err):
        return _record_failure_of_one(run, err)
    # A process that fails takes the others down with it, each with an error about the lost connection: the
    # message to show is the one of the process that failed first. Give it a moment to write its file.
    from studio.records import ErrorKind, State
    deadline = time.time() + 5
    others = []
    while not others and time.time() < deadline:
        others = [f for f in distributed.rank_failures(run.path) if f.get("rank") != where.rank]
        time.sleep(0.2)
    if others:
        first = others[0]
        return run.update_status(
            state=State.FAILED, error_kind=ErrorKind.CRASH, error=str(first.get("message", ""))[:500],
            message=f"Process {first.get('rank')} of {where.size} failed: {str(first.get('message', ''))[:400]} The "
                    "other processes stopped with it." + _resume_hint(run))
    return run.update_status(
        state=State.FAILED, error_kind=ErrorKind.WORKER_DIED, error=_plain_error(err)[:500],
        message=f"Another process of this run ({where.size} in all) ended without a word: it was killed, ran out "
                "of memory, or its machine went away. The others stopped with it." + _resume_hint(run))


def _plain_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _lost_a_peer(err: BaseException) -> bool:
    """The error a process gets when another process of its run went away in the middle of a collective."""
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("connection closed", "connection reset", "broken pipe", "peer",
                                         "distbackenderror", "nccl error", "gloo", "timed out", "timeout"))


def _resume_hint(run) -> str:
    checkpoint = run.last_checkpoint()
    return f" It can resume from {checkpoint.name}." if checkpoint else " No checkpoint was saved; start it again."


def _record_failure_of_one(run, err: BaseException):
    from studio.errors import StudioError
    from studio.records import ErrorKind, State
    from studio.stages import StageFailed
    if isinstance(err, KeyboardInterrupt):
        checkpoint = run.last_checkpoint()
        hint = f" It can resume from {checkpoint.name}." if checkpoint else " No checkpoint was saved; start it again."
        return run.update_status(state=State.INTERRUPTED, message="Stopped at once, without saving." + hint,
                                 error_kind=ErrorKind.NONE)
    if isinstance(err, StageFailed):
        return run.update_status(state=State.FAILED, message=str(err), error_kind=err.kind, error=str(err))
    if isinstance(err, StudioError):
        return run.update_status(state=State.FAILED, message=str(err), error_kind=ErrorKind.USER, error=str(err))
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        _free_partial_writes(run)
        return run.update_status(
            state=State.FAILED, error_kind=ErrorKind.DISK_FULL, error=str(err),
            message="The disk is full, so saving failed. Free some space, then resume: earlier checkpoints are intact.")
    from studio.training.loop import OOM_HINT, is_out_of_memory
    if is_out_of_memory(err):
        return run.update_status(state=State.FAILED, message=OOM_HINT, error_kind=ErrorKind.OUT_OF_MEMORY,
                                 error=str(err)[:500])
    (run.path / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
    return run.update_status(state=State.FAILED, error_kind=ErrorKind.CRASH, error=f"{type(err).__name__}: {err}",
                             message=f"Training failed: {type(err).__name__}: {err}. The full error is in error.log in "
                             "the run's folder.")


def _free_partial_writes(run) -> None:
    """After the disk filled up: remove what was being written (a checkpoint without its COMPLETE marker, a
    half-saved adapter), so the status can be written and the space goes back to the person."""
    import shutil

    from studio.runs import COMPLETE_MARKER
    for folder in [run.path / "adapter.tmp", *run.checkpoints_dir.glob("checkpoint-*")]:
        if folder.is_dir() and not (folder / COMPLETE_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def _write_bare_failure(run_dir: Path, err: BaseException) -> None:
    """The studio's own modules failed to import: write the failure with the standard library alone."""
    path = run_dir / "status.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
        status = status if isinstance(status, dict) else {}
    except (OSError, ValueError):
        status = {}
    detail = f"{type(err).__name__}: {err}"
    status.update(state="failed", error_kind="crash", error=detail, updated=time.time(), worker_pid=os.getpid(),
                  message=f"The training process could not start ({detail}). Reinstall the studio's libraries "
                  "(bash scripts/setup.sh), then start the run again.")
    tmp = path.with_name(f".status.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(status, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    traceback.print_exc()


if __name__ == "__main__":
    raise SystemExit(main())
