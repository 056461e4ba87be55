"""Run one function of the studio in a child process, with a bound on its memory and its time.

    sandbox.call("studio.inspection:inspect_standalone", {...}, seconds=120, memory_mb=3072)

The child is a fresh ``python -m studio.sandbox`` that reads the function's keyword arguments as JSON, runs
it with its data memory limited (RLIMIT_DATA), and answers with JSON. A StudioError comes back as one; running
out of memory or time comes back as a StudioError that says so. Whatever the child allocated is gone with it,
so the caller's process never holds what the function read.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from studio.errors import StudioError

ANSWER = "SANDBOX-ANSWER "


def call(function: str, kwargs: dict, seconds: float, memory_mb: int, what: str = "This") -> object:
    """`what`: how messages name the work ("The data check ...")."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    try:
        done = subprocess.run([sys.executable, "-m", "studio.sandbox", function, str(memory_mb)],
                              input=json.dumps(kwargs), capture_output=True, text=True, timeout=seconds, env=env)
    except subprocess.TimeoutExpired:
        raise StudioError(f"{what} took longer than {seconds:.0f} s, the limit here, and was stopped (a very large "
                          "file, or a chat template that takes too long to render).") from None
    found = [line[len(ANSWER):] for line in done.stdout.splitlines() if line.startswith(ANSWER)]
    if not found:
        raise StudioError(f"{what} needed more memory than the {memory_mb} MB allowed here, or its process ended "
                          f"unexpectedly (exit code {done.returncode}). Use a smaller sample of your data.")
    answer = json.loads(found[-1])
    if "error" in answer:
        raise StudioError(answer["error"])
    return answer["result"]


def _child(function: str, memory_mb: int) -> int:
    import resource
    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    kwargs = json.loads(sys.stdin.read())
    module, _, name = function.partition(":")
    try:
        result = getattr(importlib.import_module(module), name)(**kwargs)
        answer = {"result": result}
    except StudioError as err:
        answer = {"error": str(err)}
    except MemoryError:
        answer = {"error": f"This needed more memory than the {memory_mb} MB allowed here. Use a smaller sample "
                           "of your data."}
    print(ANSWER + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], int(sys.argv[2])))
