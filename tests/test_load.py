"""Bounded load against a real ``cxr-triage serve`` process on loopback.

A small queue (8) meets a burst of 500 requests at concurrency 64: every request must be answered,
200 or 503 with ``Retry-After`` (never another 5xx, never a dropped connection), each answer must
be in the audit trail and the Prometheus counters, and the server's memory must stay flat. Then a
64 MiB upload gets its 413 without the server holding the body, on a connection that stays usable.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.limits import MIB
from app.api.problems import PROBLEM_MEDIA_TYPE
from tests.live_server import LiveServer, rss_bytes, start_server

pytestmark = pytest.mark.slow

QUEUE_SIZE = 8
CONCURRENCY = 64
REQUESTS = 500
WARM_UP = 100
RSS_GROWTH_LIMIT = 24 * MIB
# The stalled-upload test's own server: a short deadline there, a generous one for the burst,
# whose admitted requests may wait seconds on a loaded machine and must still get their 200.
DEADLINE_S = 3.0
BURST_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Outcome:
    request_id: str
    status: int | None
    problem_type: str | None = None
    retry_after: str | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("load-audit") / "audit.sqlite"


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, audit_db: Path
) -> Iterator[LiveServer]:
    live = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("load"),
        env={
            "CXR_MAX_QUEUE_SIZE": str(QUEUE_SIZE),
            "CXR_MAX_BATCH_SIZE": "8",
            "CXR_DECODE_WORKERS": "2",
            "CXR_AUDIT_DB": str(audit_db),
            "CXR_REQUEST_TIMEOUT_S": str(BURST_DEADLINE_S),
        },
    )
    yield live
    live.stop()
    assert live.process.returncode == 0, live.log()[-2000:]


@pytest.fixture(scope="module")
def deadline_audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deadline-audit") / "audit.sqlite"


@pytest.fixture(scope="module")
def deadline_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, deadline_audit_db: Path
) -> Iterator[LiveServer]:
    live = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("deadline"),
        env={"CXR_AUDIT_DB": str(deadline_audit_db), "CXR_REQUEST_TIMEOUT_S": str(DEADLINE_S)},
    )
    yield live
    live.stop()
    assert live.process.returncode == 0, live.log()[-2000:]


@pytest.fixture(scope="module")
def png(nih_dir: Path) -> bytes:
    """A real NIH PNG (256 px): cheap to decode, yet 64 at once overflow a queue of 8."""
    return sorted((nih_dir / "images" / "nih-256").glob("*.png"))[0].read_bytes()


async def burst(url: str, body: bytes, n: int, concurrency: int, tag: str) -> list[Outcome]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def one(i: int) -> Outcome:
            request_id = f"{tag}-{i}"
            async with gate:
                try:
                    response = await client.post(
                        "/predict",
                        content=body,
                        headers={"Content-Type": "image/png", "X-Request-ID": request_id},
                    )
                except httpx.HTTPError as exc:
                    return Outcome(request_id, None, error=repr(exc))
            problem = None
            if response.headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE):
                problem = response.json()["type"].rsplit("/", 1)[-1]
            elif response.status_code == 200:
                assert response.json()["request_id"] == request_id
            return Outcome(
                request_id, response.status_code, problem, response.headers.get("retry-after")
            )

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_burst_is_answered_in_full_and_memory_stays_flat(
    server: LiveServer, png: bytes, audit_db: Path
) -> None:
    warm = asyncio.run(burst(server.url, png, WARM_UP, CONCURRENCY, "warm"))
    assert all(outcome.status in (200, 503) for outcome in warm)
    rss_before = rss_bytes(server.pid)
    outcomes = asyncio.run(burst(server.url, png, REQUESTS, CONCURRENCY, "load"))
    rss_after = rss_bytes(server.pid)

    errors = [outcome for outcome in outcomes if outcome.status is None]
    assert not errors, f"{len(errors)} requests got no answer, e.g. {errors[0].error}"
    statuses = Counter(outcome.status for outcome in outcomes)
    assert set(statuses) <= {200, 503}, statuses
    # The first QUEUE_SIZE to arrive find the queue empty: at least that many are served.
    assert statuses[200] >= QUEUE_SIZE, statuses
    assert statuses[503] > 0, "the small queue never filled: the test does not test shedding"
    for outcome in outcomes:
        if outcome.status == 503:
            assert outcome.problem_type == "queue-full" and outcome.retry_after, outcome

    growth = rss_after - rss_before
    print(
        f"load: {dict(statuses)}; RSS {rss_before / MIB:.1f} -> {rss_after / MIB:.1f} MiB "
        f"({growth / MIB:+.1f})"
    )
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / MIB:.1f} MiB over {REQUESTS} requests"

    # Nothing lost: the server counted and audited exactly what the client saw.
    metrics = httpx.get(f"{server.url}/metrics").text
    counted = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "cxr_requests"
        for sample in family.samples
        if sample.name == "cxr_requests_total"
    }
    served = Counter(outcome.status for outcome in [*warm, *outcomes])
    assert counted == {str(status): float(n) for status, n in served.items()}
    rows = audit_rows(audit_db, expected=len(warm) + len(outcomes))
    assert {outcome.request_id: outcome.status for outcome in outcomes} == {
        request_id: status for request_id, status in rows.items() if request_id.startswith("load-")
    }


def audit_rows(
    db: Path, expected: int = 0, *, including: str | None = None, timeout_s: float = 120.0
) -> dict[str, int]:
    """The audit rows once the writer has caught up (it commits in the background): at least
    ``expected`` of them, ``including`` that request id."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = sqlite3.connect(db)
        try:
            rows = dict(conn.execute("SELECT request_id, status FROM predictions"))
        finally:
            conn.close()
        caught_up = len(rows) >= expected and (including is None or including in rows)
        if caught_up or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def vm_hwm(pid: int) -> int:
    """Peak resident set size so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_64_mib_upload_is_413_and_never_held(server: LiveServer, png: bytes) -> None:
    peak_before = vm_hwm(server.pid)
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        response = client.post(
            "/predict", content=b"\0" * (64 * MIB), headers={"Content-Type": "application/dicom"}
        )
        assert response.status_code == 413
        assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
        assert response.json()["type"].endswith("/upload-too-large")
        # The same keep-alive connection serves the next request.
        again = client.post("/predict", content=png, headers={"Content-Type": "image/png"})
        assert again.status_code == 200
    assert vm_hwm(server.pid) - peak_before < 32 * MIB, "the server buffered the refused body"


def test_chunked_oversize_is_cut_off(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"\0" * MIB

    response = httpx.post(
        f"{server.url}/predict",
        content=chunks(),
        headers={"Content-Type": "application/dicom"},
        timeout=60.0,
    )
    assert response.status_code == 413
    assert response.json()["type"].endswith("/upload-too-large")


def test_expect_continue_gets_413_instead_of_100(server: LiveServer) -> None:
    """curl sends large files with ``Expect: 100-continue``: it must never be asked to send."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 67108864\r\nExpect: 100-continue\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 413 "), head[:200]


def test_stalled_upload_gets_504_at_the_deadline(
    deadline_server: LiveServer, deadline_audit_db: Path
) -> None:
    """A client that sends its headers and a little of its body, then stalls (slowloris), is
    answered 504 problem+json once the deadline has passed (never before), audited, and costs
    the others nothing. How late after the deadline is not bounded: only a hang fails."""
    server = deadline_server
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S + 120) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
            b"X-Request-ID: stalled-1\r\nContent-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n"
        )
        with httpx.Client(base_url=server.url, timeout=60.0) as other:
            assert other.get("/readyz").status_code == 200
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.monotonic() - started
    head = reply.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 504 "), head[:200]
    assert b"application/problem+json" in head
    assert elapsed >= DEADLINE_S, elapsed
    assert audit_rows(deadline_audit_db, including="stalled-1").get("stalled-1") == 504
