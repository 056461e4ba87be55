"""Running a check of the studio's Triton kernels under triton's interpreter on this CPU."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# scripts/setup.sh --test puts triton in a folder of its own (on sys.path it would change what TRL imports).
TRITON_FOLDER = ROOT / ".venv" / "triton-interpreter"


def passes_under_the_interpreter(script: str) -> None:
    """Runs `script` in a process of its own (the interpreter is chosen when triton is imported) with triton's
    interpreter on; it must print 'kernels ok'. Skips where triton is not installed for the interpreter."""
    if not (TRITON_FOLDER / "triton").is_dir():
        pytest.skip("triton is not installed for the interpreter (scripts/setup.sh --test installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(TRITON_FOLDER), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script + "\nprint('kernels ok')\n"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stderr[-3000:]
