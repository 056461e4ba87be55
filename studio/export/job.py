"""One export in a process of its own: ``python -m studio.export.job RUN FORMAT FOLDER``.

The server starts GGUF exports this way so that a time limit can end them for certain (the converter and the
quantiser are long native calls that no flag inside the server could interrupt) and so that a crash in native code
takes down this process, not the studio. The result is FOLDER/export.json; progress lines go to stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from studio.errors import StudioError


def run_job(run_id: str, fmt: str, folder: Path, seconds: float | None) -> dict:
    """Run the export in a child process, ended after `seconds`; its export.json as a dict."""
    command = [sys.executable, "-m", "studio.export.job", run_id, fmt, str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the converter is a grandchild: end the whole group
        process.wait()
        raise StudioError(f"The export took more than {seconds:.0f} s, the limit on this studio, and was stopped. "
                          "A smaller format (gguf-q4_k_m, adapter) is quicker.") from None
    if process.returncode != 0:
        lines = [line for line in output.strip().splitlines() if line.startswith("Error: ")]
        raise StudioError(lines[-1].removeprefix("Error: ") if lines else
                          f"The export failed (exit {process.returncode}): {output.strip()[-800:]}")
    return json.loads((folder / "export.json").read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    from studio.export.writer import write_export
    from studio.runs import open_run
    run_id, fmt, folder = argv
    try:
        write_export(open_run(run_id), fmt, Path(folder), say=lambda line: print(line, flush=True))
    except StudioError as err:
        print(f"Error: {' '.join(str(err).split())}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
