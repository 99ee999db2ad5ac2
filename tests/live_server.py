"""A real ``cxr-triage serve`` process on a free loopback port, for load and shutdown tests.

The server runs exactly as ``make serve`` runs it (the CLI, uvicorn, httptools), configured
through ``CXR_*`` environment variables; its log goes to a file so a full pipe can never stall it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone within 30 s (the test already failed)."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(
    model_dir: Path, tmp_dir: Path, *, env: dict[str, str] | None = None, ready_s: float = 180.0
) -> LiveServer:
    """Start the service and wait until ``/readyz`` answers 200.

    The server binds port 0 and the OS picks a free port, read back from uvicorn's "running on"
    line: no window between choosing a port and binding it in which another process (a parallel
    test run) could take it. ``ready_s`` only bounds a hang; a loaded machine takes seconds.
    """
    handle, name = tempfile.mkstemp(prefix="server-", suffix=".log", dir=tmp_dir)
    os.close(handle)
    log_path = Path(name)
    # Only the settings a test names reach the server: none leak in from the developer's shell.
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    child_env.update(
        {
            "CXR_INTRA_OP_THREADS": "1",
            "CXR_AUDIT_DB": "",
            "CXR_LOG_JSON": "true",
            "CXR_PACS_ENABLED": "false",  # tests that want the DICOM side say so
            **(env or {}),
        }
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--model-dir", str(model_dir)],
            cwd=REPO_ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = LiveServer(process, "", log_path)
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-3000:]}")
        if not server.url:
            bound = _RUNNING_ON.search(server.log())
            if bound:
                server.url = f"http://127.0.0.1:{bound.group(1)}"
        if server.url:
            try:
                if httpx.get(f"{server.url}/readyz", timeout=10.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
        time.sleep(0.1)  # poll interval while the server starts
    server.stop()
    raise RuntimeError(f"server not ready within {ready_s} s:\n{server.log()[-3000:]}")


_RUNNING_ON = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
