"""The studio's page server as a real process, for tests that kill it, restart it or press Ctrl-C."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ignore_ctrl_c() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Server:
    def __init__(self, log: Path, *args: str, port: int | None = None, env: dict | None = None,
                 cwd: Path | None = None, ctrl_c_ignored: bool = False):
        """ctrl_c_ignored: start it as a script's background job is started, with SIGINT ignored (it inherits that)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        self._out = open(log, "a")
        root = Path(__file__).resolve().parent.parent
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), environment.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen([sys.executable, "-m", "studio", "--port", str(self.port), *args],
                                        stdout=self._out, stderr=subprocess.STDOUT, env=environment, cwd=cwd,
                                        preexec_fn=_ignore_ctrl_c if ctrl_c_ignored else None)

    def wait_ready(self, timeout: float = 300) -> "Server":
        import httpx
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(self.url, timeout=2).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.output()
            time.sleep(0.5)
        raise AssertionError(f"the studio did not answer in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        self._out.close()
