"""The service starts and answers with no network but loopback (an air-gapped hospital host).

``unshare -rn`` gives a child a network namespace of its own holding only ``lo`` (brought up
here with one ioctl), so nothing outside the machine can be reached, whatever the code tries.
In it, this module (run as ``python -m tests.test_airgap``) starts ``cxr-triage serve`` on the
bundled model exactly as ``make serve`` does, waits for ``/readyz``, posts a shared NIH PNG to
``/predict`` and fetches ``/docs``, ``/redoc``, their assets and ``/openapi.json``. The server
runs with an audit hook (``sys.addaudithook``, through a ``sitecustomize`` on its
``PYTHONPATH``) that records every name lookup and connection to anything but loopback, so an
attempt that failed quietly inside the namespace is still seen: there must be none.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import REPO_ROOT, start_server

pytestmark = pytest.mark.slow

DEFAULT_MODEL = REPO_ROOT / "models" / "default"
# TEST-NET-1 (RFC 5737): documentation only, never routed. A UDP connect() sends no packet; it
# only asks the kernel for a route, which a loopback-only namespace does not have.
UNROUTABLE_PROBE = ("192.0.2.1", 9)

# Loaded by the server's interpreter at start-up (site imports ``sitecustomize``).
GUARD = """
import ipaddress, os, sys

_fd = os.open(os.environ["CXR_NETGUARD_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def _local(host):
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None or host in ("", "localhost") or str(host).endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name to resolve: someone wants the network


def _hook(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        address = args[1] if len(args) > 1 else None
        if isinstance(address, tuple) and address and not _local(address[0]):
            os.write(_fd, f"{event} {address!r}\\n".encode())
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        if not _local(args[0]):
            os.write(_fd, f"{event} {args[0]!r}\\n".encode())


sys.addaudithook(_hook)
"""


def bring_up_loopback() -> None:
    """``ip link set lo up`` without iproute2: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


def outside_reachable() -> str | None:
    """None when the kernel has no route off this host; else what it answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(UNROUTABLE_PROBE)
        except OSError as exc:
            return None if exc.errno == errno.ENETUNREACH else repr(exc)
        return f"a route exists (local address {sock.getsockname()})"


def inside(model_dir: Path, png: Path, work: Path) -> dict[str, Any]:
    """Run in the namespace: serve, call the API, report what happened."""
    import httpx

    bring_up_loopback()
    report: dict[str, Any] = {
        "interfaces": [name for _, name in socket.if_nameindex()],
        "outside_reachable": outside_reachable(),
    }
    guard_dir = work / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    guard_log = work / "netguard.log"
    guard_log.touch()
    server = start_server(
        model_dir,
        work,
        env={"PYTHONPATH": f"{guard_dir}:{REPO_ROOT}", "CXR_NETGUARD_LOG": str(guard_log)},
    )
    try:
        with httpx.Client(base_url=server.url, timeout=120.0, trust_env=False) as client:
            ready = client.get("/readyz")
            report["readyz"] = ready.status_code
            predicted = client.post(
                "/predict", content=png.read_bytes(), headers={"Content-Type": "image/png"}
            )
            report["predict"] = predicted.status_code
            report["findings"] = len(predicted.json().get("findings", []))
            pages = {}
            for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
                page = client.get(path)
                pages[path] = page.status_code
                if path in ("/docs", "/redoc"):
                    # Every asset the page names is served here.
                    for asset in _local_assets(page.text):
                        pages[asset] = client.get(asset).status_code
            report["pages"] = pages
    finally:
        server.stop()
    report["server_exit"] = server.process.returncode
    report["netguard"] = guard_log.read_text().splitlines()
    return report


def _local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/[^"]+)"', html)


def unshare_command() -> list[str]:
    """The prefix that runs a command in a new loopback-only network namespace, or skip."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no 'unshare' (util-linux) to make a network namespace")
    for prefix in ([unshare, "-rn"], [unshare, "-n"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return prefix
    pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()[:300]}")


def test_serves_with_networking_limited_to_loopback(nih_dir: Path) -> None:
    if not (DEFAULT_MODEL / "model.onnx").is_file():
        pytest.skip(f"no bundled model at {DEFAULT_MODEL}")
    png = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0]
    labels = json.loads((DEFAULT_MODEL / "model_card.json").read_text())["labels"]
    with tempfile.TemporaryDirectory(prefix="cxr-airgap-") as work:
        child = subprocess.Popen(
            [*unshare_command(), sys.executable, "-m", "tests.test_airgap",
             str(DEFAULT_MODEL), str(png), work],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its server too: a hang is killed as one group
        )  # fmt: skip
        try:
            stdout, stderr = child.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
    assert child.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    # The namespace really is cut off: only lo, and no route to anywhere else.
    assert report["interfaces"] == ["lo"], report
    assert report["outside_reachable"] is None, report
    # And the service works in it.
    assert report["readyz"] == 200, report
    assert report["predict"] == 200 and report["findings"] == len(labels), report
    assert all(status == 200 for status in report["pages"].values()), report["pages"]
    assert any("swagger-ui-bundle.js" in p for p in report["pages"]), report["pages"]
    assert any("redoc.standalone.js" in p for p in report["pages"]), report["pages"]
    # Nothing in the server even tried to resolve a name or open a connection off the host.
    assert report["netguard"] == [], report["netguard"]
    assert report["server_exit"] == 0, report


def test_network_guard_sees_an_outside_attempt(tmp_path: Path) -> None:
    """The audit hook above is live: a lookup and a connect to the outside are both recorded.

    Run in the namespace as well, so the probe's DNS query and datagram cannot leave the host.
    """
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "netguard.log"
    probe = textwrap.dedent(
        """
        import socket
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for call in (lambda: socket.getaddrinfo("pypi.invalid", 443),
                     lambda: udp.connect(("192.0.2.1", 9)),
                     lambda: socket.getaddrinfo("localhost", 80)):
            try:
                call()
            except OSError:
                pass
        """
    )
    subprocess.run(
        [*unshare_command(), sys.executable, "-c", probe],
        env={"PYTHONPATH": str(guard_dir), "CXR_NETGUARD_LOG": str(log), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=60,
    )
    lines = log.read_text().splitlines()
    assert any("getaddrinfo 'pypi.invalid'" in line for line in lines), lines
    assert any("connect ('192.0.2.1', 9)" in line for line in lines), lines
    assert not any("localhost" in line for line in lines), lines


if __name__ == "__main__":
    print(json.dumps(inside(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))))
