"""Training on several GPUs, or several machines: which processes a run needs, how they are started, and what
each of them may write.

A run that asks for more than one process (``devices.gpus``, ``devices.nodes``) is started by the launcher under
PyTorch's own launcher, ``torchrun``, which starts one worker per GPU on each machine and tells each its rank; the
Hugging Face Trainer inside each worker then trains with DDP or FSDP2 (accelerate). On a machine without GPUs the
same path runs as CPU processes that talk over gloo: slower than one process, but it is how the distributed code
is tested here, and how a config can be tried before it goes to a cluster.

Who writes what: on each machine its first process (local rank 0) keeps that machine's run folder: status,
metrics, checkpoints, and on the first machine (global rank 0) the adapter. The others write nothing but a file
naming their pid and, if they fail, their error, so the run's status can say which process failed and why.
Decisions every process must take together (stop now, the tokens counted) go through one small all-reduce.

Only the standard library at import: the launcher and the page's server use this module without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

RANKS_DIR = "ranks"  # in the run folder: <rank>.pid and, after a failure, <rank>.error (one per process)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (torchrun's environment; one process: all zeros)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def keeps_records(self) -> bool:
        """This process writes its machine's run folder (the first process on each machine)."""
        return self.local_rank == 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    try:
        return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))))
    except ValueError:
        return World()


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_gib: float
    total_gib: float

    def label(self) -> str:
        return f"GPU {self.index}: {self.name}, {self.free_gib:.0f} of {self.total_gib:.0f} GiB free"


def detect_gpus() -> list[Gpu]:
    """The NVIDIA GPUs of this machine with their free memory, from nvidia-smi (no CUDA context is made here, so
    the page's server takes no GPU memory to ask). None found, or no nvidia-smi: an empty list."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                gpus.append(Gpu(int(parts[0]), parts[1], float(parts[2]) / 1024, float(parts[3]) / 1024))
            except ValueError:
                continue
    return gpus


def parse_gpus(spec: str) -> tuple[int, list[int] | None]:
    """devices.gpus as (count, the chosen indices or None). '' -> (1, None); 'all' -> (0, None), meaning every
    GPU found; '3' -> (3, None); '0,2' -> (2, [0, 2]). StudioError for anything else."""
    spec = (spec or "").strip().lower().replace(" ", "")
    if spec in ("", "1"):
        return 1, None
    if spec == "all":
        return 0, None
    if spec.isdigit():
        count = int(spec)
        if not 1 <= count <= 1024:
            raise StudioError(f"devices.gpus = {spec!r}: use a count from 1, 'all', or GPU numbers like 0,1.")
        return count, None
    try:
        indices = [int(part) for part in spec.split(",") if part != ""]
    except ValueError:
        indices = []
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise StudioError(f"devices.gpus = {spec!r} is not understood: leave it empty for one GPU, write 'all', a "
                          "count such as 2, or the GPUs' numbers such as 0,1 (each once).")
    return len(indices), indices


@dataclass(frozen=True)
class Placement:
    """Where a run's processes go: per machine, which GPUs (None: the first `per_node`, or CPU processes)."""
    per_node: int
    gpu_indices: list[int] | None
    nodes: int
    on_gpus: bool

    @property
    def processes(self) -> int:
        return self.per_node * self.nodes

    @property
    def distributed(self) -> bool:
        return self.processes > 1


def placement(devices, gpus: list[Gpu] | None = None) -> Placement:
    """Resolve a run's `devices` section against this machine's GPUs (detected when not given)."""
    gpus = detect_gpus() if gpus is None else gpus
    count, indices = parse_gpus(devices.gpus)
    if gpus:
        known = {g.index for g in gpus}
        if indices is not None:
            missing = [i for i in indices if i not in known]
            if missing:
                raise StudioError(f"devices.gpus asks for GPU {', '.join(map(str, missing))}, but this machine has "
                                  f"GPU {', '.join(str(g.index) for g in gpus)}.")
        elif count == 0:
            count = len(gpus)
        elif count > len(gpus):
            raise StudioError(f"devices.gpus = {devices.gpus!r}, but this machine has {len(gpus)} GPU"
                              f"{'s' if len(gpus) != 1 else ''}. Use a count up to {len(gpus)}, or 'all'.")
        return Placement(count, indices, devices.nodes, True)
    if indices is not None:
        raise StudioError(f"devices.gpus = {devices.gpus!r} names GPUs, but this machine has none that nvidia-smi "
                          "lists. Leave it empty to train on the CPU.")
    return Placement(max(1, count), None, devices.nodes, False)


def launch_command(python: str, run_dir: Path, resume: bool, devices, where: Placement) -> tuple[list[str], dict]:
    """The command (and environment changes) that start a distributed run's workers on this machine."""
    args = [python, "-m", "torch.distributed.run", f"--nproc-per-node={where.per_node}"]
    if devices.nodes > 1:
        host, port = split_master(devices.master)
        args += [f"--nnodes={devices.nodes}", f"--node-rank={devices.node_rank}", f"--master-addr={host}",
                 f"--master-port={port}"]
    else:
        args += ["--standalone"]  # one machine: a free port on localhost, found by torchrun itself
    args += ["-m", "studio.training.worker", str(run_dir), *(["--resume"] if resume else [])]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // where.per_node))}
    if where.gpu_indices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, where.gpu_indices))
    # NVLink multicast stays off: it is not available on every host that lends several GPUs (it hangs there).
    env.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    return args, env


def split_master(master: str) -> tuple[str, int]:
    host, _, port = (master or "").strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StudioError(f"devices.master = {master!r}: write the first machine's address and a free port, like "
                          "10.0.0.1:29500. Every machine of the run uses the same one.")
    return host, int(port)


# --- inside a worker (these import torch) ---
def agree_any(*flags: bool) -> tuple[bool, ...]:
    """Each flag True on every process when it is True on any: a Stop seen by one process stops them all at the
    same step. Without a process group (one process), the flags themselves."""
    import torch
    import torch.distributed as dist
    group = _host_group()
    if group is None:
        return tuple(bool(f) for f in flags)
    value = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(v > 0) for v in value.tolist())


def total(number: float) -> float:
    """The sum of `number` over every process (the tokens each one trained on, say)."""
    import torch
    import torch.distributed as dist
    group = _host_group()
    if group is None:
        return number
    value = torch.tensor([float(number)], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return float(value.item())


_host_groups: dict = {}


def _host_group():
    """A process group over the host's network (gloo) for these small agreements: on GPUs the training's own NCCL
    group would make each one wait for the GPU to finish its queued work, every step. None for one process."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if "gloo" not in _host_groups:
        _host_groups["gloo"] = dist.new_group(backend="gloo")  # every process reaches this at the same step
    return _host_groups["gloo"]


# --- rank files: which process is which, and why one failed ---
def note_rank(run_dir: Path, where: World) -> None:
    folder = Path(run_dir) / RANKS_DIR
    folder.mkdir(exist_ok=True)
    (folder / f"{where.rank}.pid").write_text(str(os.getpid()), encoding="utf-8")
    (folder / f"{where.rank}.error").unlink(missing_ok=True)


def note_rank_failure(run_dir: Path, where: World, message: str) -> None:
    folder = Path(run_dir) / RANKS_DIR
    folder.mkdir(exist_ok=True)
    (folder / f"{where.rank}.error").write_text(json.dumps({"rank": where.rank, "message": message}),
                                                encoding="utf-8")


def rank_failures(run_dir: Path) -> list[dict]:
    folder = Path(run_dir) / RANKS_DIR
    found = []
    for path in sorted(folder.glob("*.error")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found


def rank_pids(run_dir: Path) -> dict[int, int]:
    folder = Path(run_dir) / RANKS_DIR
    pids = {}
    for path in folder.glob("*.pid") if folder.is_dir() else []:
        try:
            pids[int(path.stem)] = int(path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue
    return pids


def clear_ranks(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / RANKS_DIR, ignore_errors=True)


def end_with_parent() -> None:
    """Linux: this process is killed when the process that started it (torchrun's agent) dies, so a run whose
    agent was killed leaves no rank behind training alone."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
