"""Receive benchmark: what "0x0000 means we have it" costs, C-STORE and STOW-RS.

One ``cxr-triage serve`` process (the real CLI, DICOM side on) with a one-hour stable window, so
nothing is scored while this runs: only the receive path is measured (parse, pixel hash, write
to a temporary file, fsync, rename, directory fsync, the study row committed with
``synchronous=FULL``, the audit row queued). Instances are 1024 x 1024 12-bit DX images from the
shared NIH PNGs (about 2 MiB each, fresh UIDs, fake patient data).

(a) C-STORE: ``--instances`` instances on one association, time from sending each to its
    0x0000 (median, p90) and instances per second over the whole run;
(b) STOW-RS: ``--requests`` requests of ``--per-request`` instances each, time per request.

    .venv/bin/python benchmarks/pacs_receive_bench.py            # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from pynetdicom import AE  # noqa: E402

from app.settings import DEFAULT_MODEL_DIR  # noqa: E402
from tests.dicom_factory import make_dataset, nih_pngs, to_bytes  # noqa: E402
from tests.live_server import free_port, start_server  # noqa: E402
from tests.pacs_in_fixtures import stow_body  # noqa: E402

DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))


def p90(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.9 * len(values)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--per-request", type=int, default=4)
    args = parser.parse_args()
    pngs = nih_pngs(DATA_DIR)
    if not pngs:
        print(f"no NIH PNGs under {DATA_DIR}", file=sys.stderr)
        return 2
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="pacs-receive-bench-") as tmp:
        folder = Path(tmp)
        port = free_port()
        server = start_server(
            DEFAULT_MODEL_DIR,
            folder,
            env={
                "CXR_PACS_ENABLED": "true",
                "CXR_DICOM_PORT": str(port),
                "CXR_STUDY_STABLE_S": "3600",
                "CXR_PACS_STORAGE_DIR": str(folder / "pacs"),
                "CXR_OUTBOX_DB": str(folder / "pacs" / "outbox.sqlite"),
                "CXR_AUDIT_DB": str(folder / "audit.sqlite"),
            },
        )
        try:
            datasets = [make_dataset(pngs[i % len(pngs)]) for i in range(args.instances)]
            size_mib = len(to_bytes(datasets[0])) / 2**20
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(datasets[0].SOPClassUID)
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
            assert assoc.is_established
            times = []
            started = time.perf_counter()
            for ds in datasets:
                t0 = time.perf_counter()
                status = assoc.send_c_store(ds)
                times.append(time.perf_counter() - t0)
                assert status.Status == 0x0000, hex(status.Status)
            total = time.perf_counter() - started
            assoc.release()
            print(
                f"(a) C-STORE, {args.instances} x {size_mib:.1f} MiB DX on one association: "
                f"median {1000 * statistics.median(times):.0f} ms, p90 {1000 * p90(times):.0f} ms "
                f"per instance to 0x0000; {args.instances / total:.1f} instances/s"
            )
            request_times = []
            for _ in range(args.requests):
                parts = [
                    to_bytes(make_dataset(pngs[i % len(pngs)])) for i in range(args.per_request)
                ]
                body, content_type = stow_body(parts)
                t0 = time.perf_counter()
                response = httpx.post(
                    f"{server.url}/dicomweb/studies",
                    content=body,
                    headers={"Content-Type": content_type},
                    timeout=120,
                )
                request_times.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text
            print(
                f"(b) STOW-RS, {args.requests} requests of {args.per_request} instances: median "
                f"{1000 * statistics.median(request_times):.0f} ms, p90 "
                f"{1000 * p90(request_times):.0f} ms per request "
                f"({1000 * statistics.median(request_times) / args.per_request:.0f} ms per "
                "instance)"
            )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
