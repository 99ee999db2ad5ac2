"""PACS benchmark: studies by C-STORE until their SR and SC are delivered, vs POST /predict.

One ``cxr-triage serve`` process (the real CLI, DICOM side on) with ``CXR_DESTINATIONS`` pointing
at a pynetdicom storage SCP inside this process, which notes when each result object arrives.
Studies are one-image PA studies built from the shared 1024 px NIH PNGs (fake patient data,
``tests/dicom_factory.py``), each with fresh UIDs.

(a) latency, one study at a time: C-STORE response to both result objects received, minus the
    stable window the service waits by design (``--stable-s``), against
    ``POST /predict?heatmap=true`` of the same image as a DICOM upload. The difference is what
    the PACS path adds per study: storing the instance, the eligibility gate, writing the SR
    and the 1024 px SC, the outbox commit and the two C-STOREs back;
(b) throughput: ``--studies`` studies sent back to back on ``--senders`` parallel associations;
    studies per minute = studies / (last result received - first C-STORE sent);
(c) CPU time (``time.process_time``, this process, median of 7) to build one study's SR and SC
    with ``app.pacs.results``, the part of (a) that is ours rather than the network's.

Figures are medians (p90 given too); a shared machine makes them noisy, so the command is
printed with them and they belong in the docs only with it.

    .venv/bin/python benchmarks/pacs_bench.py                     # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/pacs_bench.py --studies 60 --senders 4
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402

from app.settings import DEFAULT_MODEL_DIR  # noqa: E402
from tests.dicom_factory import make_dataset, nih_pngs, to_bytes  # noqa: E402

DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Receiver:
    """Storage SCP standing in for the PACS: arrival time of each study's SR and SC."""

    port: int = 0
    arrivals: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def start(self) -> Receiver:
        ae = AE(ae_title="BENCHPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])
        return self

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        kind = "sr" if ds.Modality == "SR" else "sc"
        with self.lock:
            self.arrivals.setdefault(str(ds.StudyInstanceUID), {})[kind] = time.perf_counter()
        return 0x0000

    def done_at(self, study_uid: str) -> float | None:
        with self.lock:
            got = self.arrivals.get(study_uid, {})
            return max(got.values()) if {"sr", "sc"} <= set(got) else None

    def stop(self) -> None:
        self.server.shutdown()


class Service:
    """``cxr-triage serve`` with the DICOM side on, results sent to the receiver."""

    def __init__(self, state: Path, receiver_port: int, stable_s: float, threads: int) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(
            {
                "CXR_PACS_ENABLED": "true",
                "CXR_DICOM_PORT": str(self.dicom_port),
                "CXR_DESTINATIONS": f"dimse://BENCHPACS@127.0.0.1:{receiver_port}",
                "CXR_STUDY_STABLE_S": str(stable_s),
                "CXR_PACS_STORAGE_DIR": str(state / "pacs"),
                "CXR_OUTBOX_DB": str(state / "pacs" / "outbox.sqlite"),
                "CXR_AUDIT_DB": str(state / "audit.sqlite"),
                "CXR_INTRA_OP_THREADS": str(threads),
                "CXR_LOG_LEVEL": "WARNING",
            }
        )
        self.log = (state / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.http_port), "--model-dir", str(DEFAULT_MODEL_DIR)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"service exited; see {state / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("service not ready in 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


def make_studies(count: int) -> list[bytes]:
    pngs = nih_pngs(DATA_DIR)
    if not pngs:
        raise SystemExit(f"no NIH PNGs under {DATA_DIR} (set CXR_DATA_DIR)")
    return [to_bytes(make_dataset(pngs[i % len(pngs)])) for i in range(count)]


def c_store(port: int, files: list[bytes]) -> list[tuple[str, float]]:
    """Send files on one association; (StudyInstanceUID, time of each C-STORE response)."""
    from io import BytesIO

    from pydicom import dcmread

    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    if not assoc.is_established:
        raise SystemExit("the service refused the association")
    sent = []
    try:
        for data in files:
            ds = dcmread(BytesIO(data))
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0:
                raise SystemExit(f"C-STORE failed: {status}")
            sent.append((str(ds.StudyInstanceUID), time.perf_counter()))
    finally:
        assoc.release()
    return sent


def wait_delivered(receiver: Receiver, study_uids: list[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [receiver.done_at(uid) for uid in study_uids]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None)
        time.sleep(0.005)
    missing = [u for u in study_uids if receiver.done_at(u) is None]
    raise SystemExit(f"{len(missing)} studies not delivered in {timeout} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--studies", type=int, default=30, help="throughput phase")
    parser.add_argument("--senders", type=int, default=2, help="parallel associations")
    parser.add_argument("--stable-s", type=float, default=0.5, help="CXR_STUDY_STABLE_S")
    parser.add_argument("--threads", type=int, default=1, help="CXR_INTRA_OP_THREADS")
    args = parser.parse_args(argv)
    command = "    " + shlex.join([".venv/bin/python", "benchmarks/pacs_bench.py", *sys.argv[1:]])

    receiver = Receiver().start()
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        service = Service(Path(tmp), receiver.port, args.stable_s, args.threads)
        try:
            files = make_studies(args.latency_studies + args.studies)
            warm = files[0]
            wait_delivered(receiver, [uid for uid, _ in c_store(service.dicom_port, [warm])], 120)

            # (a) latency, one study at a time, and POST /predict of the same bytes.
            pacs_s, predict_s = [], []
            with httpx.Client(timeout=60) as client:
                for data in files[1 : args.latency_studies + 1]:
                    start = time.perf_counter()
                    response = client.post(
                        f"{service.url}/predict?heatmap=true",
                        content=data,
                        headers={"Content-Type": "application/dicom"},
                    )
                    predict_s.append(time.perf_counter() - start)
                    if response.status_code != 200:
                        raise SystemExit(f"/predict answered {response.status_code}")
                    ((uid, sent_at),) = c_store(service.dicom_port, [data])
                    pacs_s.append(wait_delivered(receiver, [uid], 120) - sent_at - args.stable_s)

            # (b) throughput: everything at once on parallel associations.
            batch = files[args.latency_studies + 1 :]
            chunks = [batch[i :: args.senders] for i in range(args.senders)]
            results: list[list[tuple[str, float]]] = [[] for _ in chunks]
            first = time.perf_counter()
            threads = [
                threading.Thread(
                    target=lambda i=i: results.__setitem__(
                        i, c_store(service.dicom_port, chunks[i])
                    )
                )
                for i in range(len(chunks))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            uids = [uid for part in results for uid, _ in part]
            last = wait_delivered(receiver, uids, 600)
            elapsed = last - first
        finally:
            service.stop()
            receiver.stop()

    sr_cpu, sc_cpu = result_cpu(files[0])
    added = [p - q for p, q in zip(pacs_s, predict_s, strict=True)]
    print(command)
    print(f"machine: {os.cpu_count()} CPUs; stable window {args.stable_s} s (subtracted below)")
    print(f"(a) one study at a time, n={len(pacs_s)} one-image 1024 px DX studies:")
    print(
        f"    C-STORE -> SR+SC delivered: median {statistics.median(pacs_s) * 1000:.0f} ms, "
        f"p90 {percentile(pacs_s, 0.9) * 1000:.0f} ms"
    )
    print(
        f"    POST /predict?heatmap=true:  median {statistics.median(predict_s) * 1000:.0f} ms, "
        f"p90 {percentile(predict_s, 0.9) * 1000:.0f} ms"
    )
    print(f"    added by the PACS path:      median {statistics.median(added) * 1000:.0f} ms")
    print(
        f"(b) {len(uids)} studies on {args.senders} associations: {elapsed:.1f} s until the last "
        f"SR+SC arrived = {len(uids) / elapsed * 60:.0f} studies/min"
    )
    print(f"(c) CPU to build one study's SR {sr_cpu * 1000:.0f} ms, SC {sc_cpu * 1000:.0f} ms")
    return 0


def result_cpu(data: bytes) -> tuple[float, float]:
    """Median CPU seconds of build_sr and build_sc for one stored, scored study."""
    from app.pacs.results import _read_headers, build_sc, build_sr
    from tests.pacs_out_fixtures import default_runtime, score_study

    runtime = default_runtime()
    with tempfile.TemporaryDirectory(prefix="pacs-bench-cpu-") as tmp:
        path = Path(tmp) / "study.dcm"
        path.write_bytes(data)
        result = score_study([path], runtime)
        headers = _read_headers(result.instances)
        sr, sc = [], []
        for _ in range(7):
            start = time.process_time()
            build_sr(result, runtime.card, headers)
            sr.append(time.process_time() - start)
            start = time.process_time()
            build_sc(result, runtime.card, headers)
            sc.append(time.process_time() - start)
    return statistics.median(sr), statistics.median(sc)


if __name__ == "__main__":
    raise SystemExit(main())
