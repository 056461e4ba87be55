"""The one way a run starts: a worker process on its run folder, for the page, the API and the CLI alike.

  start(cfg)     take the training slot (slot.py), create the run folder, start the worker
  resume(ref)    the same for a run that stopped, from its last complete checkpoint
  stop(run)      ask the worker to stop after its current step (a request file it checks every step)
  reconcile(run) a run that says it is training but whose worker is gone becomes interrupted (or failed)

The worker runs in a process session of its own, so it outlives whoever started it: the page's server can
be killed, or the terminal closed, and the run goes on; a restarted server finds it through the slot and
shows it. What the worker prints goes to the run's worker.log. Whoever started a worker also watches it: when
it ends without having written how (killed, crashed in native code), the run's status says so within a
second, with its exit code and the end of its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from studio import distributed, slot
from studio.config import RunConfig
from studio.errors import StudioError
from studio.records import ACTIVE, RESUMABLE, ErrorKind, State
from studio.runs import Run, checkpoint_step, list_runs, new_run, open_run


@dataclass
class Launched:
    """A worker this process started."""
    run: Run
    process: subprocess.Popen

    def alive(self) -> bool:
        return self.process.poll() is None


_launched: list[Launched] = []
_launched_lock = threading.Lock()


def start(cfg: RunConfig, owner: str = "") -> Launched:
    """Start a new run of `cfg` in a worker; BusyError at once if any run trains anywhere on this machine.
    `owner`: who started it, on a shared page."""
    cfg.validate()
    distributed.placement(cfg.devices)  # GPUs this machine lacks are refused before anything is made
    claim = slot.claim(slot.STARTING)  # named once its folder exists: the id is made unique then
    try:
        run = new_run(cfg, owner)
        claim.rename(run.id)
        return _spawn(run, claim, resume=False)
    except BaseException:
        claim.release()
        raise


def resume(ref: str) -> Launched:
    """Continue a stopped, failed or interrupted run from its last complete checkpoint."""
    run = open_run(ref)
    reconcile(run)
    status = run.stored_status()
    if status.state in ACTIVE or (slot.holder() or slot.Holder("", 0)).run_id == run.id:
        raise StudioError(f"Run {run.id} is still training; it cannot be resumed while its worker runs.")
    if status.state not in RESUMABLE:
        raise StudioError(f"Run {run.id} is {status.state.value}; only interrupted, failed or stopped runs can resume.")
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise StudioError(f"Run {run.id} has no complete checkpoint to resume from. Start it again instead.")
    claim = slot.claim(run.id)
    try:
        # Forget now the steps after the checkpoint, so the plot never shows them while the model loads.
        run.truncate_metrics_after(checkpoint_step(checkpoint))
        run.clear_stop_request()
        run.update_status(state=State.QUEUED, message="Resuming from the last checkpoint.", worker_pid=0)
        return _spawn(run, claim, resume=True)
    except BaseException:
        claim.release()
        raise


def _spawn(run: Run, claim: slot.Claim, resume: bool) -> Launched:
    arguments = [str(run.path), *(["--resume"] if resume else [])]
    cfg = run.config()
    where = distributed.placement(cfg.devices)
    distributed.clear_ranks(run.path)
    with open(run.log_file, "ab") as log:
        log.write(f"--- worker started {time.strftime('%Y-%m-%d %H:%M:%S')}{' (resume)' if resume else ''}"
                  f"{f' ({where.per_node} processes on this machine)' if where.distributed else ''}\n".encode())
    if where.distributed:
        _check_world_size(run, where, resume)
        # torchrun's agent starts the run's processes and watches them; it holds the slot's lock meanwhile.
        command, changes = distributed.launch_command(sys.executable, run.path, resume, cfg.devices, where)
        with open(run.log_file, "ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, pass_fds=(claim.fd,),
                                       env={**_worker_environment(), **changes})
    else:
        # A GPU picked by number needs a worker that sees only it; the spare was started seeing them all.
        process = _hand_to_spare(arguments, run, claim) if where.gpu_indices is None else None
    if process is None:
        env = _worker_environment()
        if where.gpu_indices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, where.gpu_indices))
        with open(run.log_file, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "studio.training.worker", *arguments],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, pass_fds=(claim.fd,), env=env)
    claim.hand_over(process.pid)
    launched = Launched(run, process)
    with _launched_lock:
        _launched.append(launched)
    threading.Thread(target=_watch, args=(launched,), name=f"watch-{run.id}", daemon=True).start()
    return launched


def _check_world_size(run: Run, where: distributed.Placement, resume: bool) -> None:
    """Record how many processes the run trains on; a resume on another number is allowed for DDP (the effective
    batch changes, and the status says so) and refused for FSDP2 (its checkpoint is split per process)."""
    before = run.stored_status().processes
    if resume and before and before != where.processes:
        plan = run.stored_status().plan or {}
        if plan.get("strategy") == "fsdp":
            raise StudioError(f"Run {run.id} trained on {before} processes with FSDP2, whose checkpoints are split "
                              f"per process; resume it on {before} (devices.gpus), not {where.processes}.")
        run.update_status(message=f"Resuming on {where.processes} processes where it trained on {before}: each step "
                                  f"now takes {where.processes} batches instead of {before}, so the steps left and "
                                  "the schedule differ from the first plan.")
    run.update_status(processes=where.processes)


def _worker_environment() -> dict:
    env = dict(os.environ)
    # The worker must import this same studio, also where it is not installed (a source checkout, tests).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _watch(launched: Launched) -> None:
    code = launched.process.wait()
    after_exit(launched.run, code)
    if _spare.wanted:
        keep_spare_ready()


class _Spare:
    """A worker process that has imported the training libraries and waits for a run (worker.py --spare):
    with it, Start on the page reaches the first step without the ~10 s of imports of a fresh process."""
    wanted = False
    process: subprocess.Popen | None = None
    channel: socket.socket | None = None
    lock = threading.Lock()


_spare = _Spare()


def keep_spare_ready() -> None:
    """Keep one spare worker waiting (the page's server asks for this; the CLI starts its one run fresh).
    A new spare is made only while no run trains, so its imports never take the CPU from a run.
    STUDIO_SPARE_WORKER=0 turns this off (the spare holds the libraries' memory, ~0.5 GB on a CPU)."""
    if os.environ.get("STUDIO_SPARE_WORKER", "1") == "0":
        return
    with _spare.lock:
        _spare.wanted = True
        if (_spare.process is not None and _spare.process.poll() is None) or slot.holder() is not None:
            return
        ours, theirs = socket.socketpair()
        with open(slot.lock_path().with_name("spare-worker.log"), "ab") as log:
            _spare.process = subprocess.Popen(
                [sys.executable, "-m", "studio.training.worker", "--spare", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=(theirs.fileno(),), env=_worker_environment())
        theirs.close()
        _spare.channel = ours


def close_spare() -> None:
    """Let the spare go (it ends when its socket closes)."""
    with _spare.lock:
        _spare.wanted = False
        if _spare.channel is not None:
            _spare.channel.close()
        if _spare.process is not None:
            try:
                _spare.process.wait(10)
            except subprocess.TimeoutExpired:
                _spare.process.kill()
        _spare.process = _spare.channel = None


def _hand_to_spare(arguments: list[str], run: Run, claim: slot.Claim) -> subprocess.Popen | None:
    """Give the run and the slot's lock to the waiting spare; None when there is none (or it is gone)."""
    with _spare.lock:
        process, channel = _spare.process, _spare.channel
        _spare.process = _spare.channel = None
    if process is None or channel is None or process.poll() is not None:
        return None
    job = json.dumps({"args": arguments, "log": str(run.log_file)}).encode()
    try:
        socket.send_fds(channel, [job], [claim.fd])
        channel.settimeout(600)  # it may still be importing; it answers once it holds the lock
        taken = channel.recv(16) == b"taken"
    except OSError:
        taken = False
    channel.close()
    if not taken:
        process.kill()
        return None
    return process


def after_exit(run: Run, code: int) -> None:
    """The worker of `run` ended with exit `code`: if it left the run looking alive, say what happened."""
    status = run.stored_status()
    if status.state not in ACTIVE:
        return
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        _mark_interrupted(run, f"The training process was stopped by a signal ({name}).")
        return
    tail = _log_tail(run)
    run.update_status(state=State.FAILED, error_kind=ErrorKind.WORKER_DIED, error=f"exit code {code}",
                      message=f"The training process ended with exit code {code} before it said why."
                      + (f" The end of its log: {tail}" if tail else ""))


def _log_tail(run: Run, lines: int = 3) -> str:
    try:
        text = run.log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("--- worker")]
    return " | ".join(kept[-lines:])[-600:]


def _mark_interrupted(run: Run, why: str) -> None:
    checkpoint = run.last_checkpoint()
    hint = (f" It can resume from {checkpoint.name}." if checkpoint else " No checkpoint was saved; start it again.")
    run.update_status(state=State.INTERRUPTED, message=why + hint)


def reconcile(run: Run) -> None:
    """A run marked queued/running/stopping with no live worker holding the slot for it was cut off (the
    studio or the machine stopped, or its worker was killed while nobody watched)."""
    status = run.stored_status()
    if status.state not in ACTIVE:
        return
    holder = slot.holder()
    if holder is not None and (holder.run_id == run.id or (holder.run_id == slot.STARTING
                                                          and status.state is State.QUEUED)):
        return
    with _launched_lock:
        watched = any(item.run.path == run.path and item.alive() for item in _launched)
    if watched:
        return
    _mark_interrupted(run, "The run's training process is no longer running.")


def reconcile_all() -> list[str]:
    """reconcile() every run; the ids of those it marked."""
    marked = []
    for run in list_runs():
        before = run.stored_status().state
        reconcile(run)
        if run.stored_status().state is not before:
            marked.append(run.id)
    return marked


def active_run() -> Run | None:
    """The run training now on this machine (started by any process), or None."""
    holder = slot.holder()
    if holder is None:
        return None
    try:
        return open_run(holder.run_id)
    except StudioError:
        return None


def stop(run: Run | None = None, grace_s: float | None = None) -> str:
    """Ask `run` (default: the active one) to stop after its current step. Safe twice and when idle.
    `grace_s`: if its worker is still running that long after the request (stuck in a step, a download or a
    chat template that never ends), it is ended; the run can then resume from its last checkpoint."""
    run = run or active_run()
    if run is None or run.stored_status().state not in ACTIVE:
        return "No run is training, so there is nothing to stop."
    if run.stop_requested():
        return f"Run {run.id} is already stopping."
    run.request_stop()
    if grace_s is not None:
        holder = slot.holder()
        if holder is not None and holder.run_id == run.id:
            timer = threading.Timer(grace_s, _end_if_still_running, (run, holder))
            timer.daemon = True
            timer.start()
    return f"Stopping run {run.id} after the current step."


def _end_if_still_running(run: Run, holder: slot.Holder) -> None:
    if slot.is_running(holder.pid, holder.started) and (slot.holder() or slot.Holder("", 0)).pid == holder.pid:
        os.kill(holder.pid, signal.SIGKILL)
        end_ranks(run)
        # Its watcher (if this process started it) or the next reconcile records it as interrupted.


def end_ranks(run: Run) -> None:
    """Kill what is left of a distributed run's processes on this machine (each also dies with torchrun's agent,
    where the system allows it: distributed.end_with_parent)."""
    for pid in distributed.rank_pids(run.path).values():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"studio.training.worker" not in fh.read():
                    continue  # the pid was reused by something else
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue


def started_here() -> list[Launched]:
    """Workers this process started that are still running."""
    with _launched_lock:
        return [item for item in _launched if item.alive()]


def wait(launched: Launched, timeout: float | None = None) -> bool:
    """Block until the worker ends and its watcher has recorded it; True if it ended in time."""
    try:
        launched.process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    after_exit(launched.run, launched.process.returncode)
    return True
