"""Decode throughput against workers, threads vs processes, for PNG and each DICOM transfer syntax.

Each worker runs the service's own no-heatmap request path (``prepare_input``: sniff, decode,
reduced decode where the codec allows it, resize, normalise) on the same bytes, closed loop with
two tasks in flight per worker, for about ``--seconds`` per cell:

- ``threads``: a ``ThreadPoolExecutor`` in this process, what ``CXR_DECODE_WORKERS`` gives;
- ``processes``: spawned worker processes (``app.imaging.prepare.DecodeProcesses``, what
  ``CXR_DECODE_PROCESSES`` gives): the bytes go over, the 224 px input comes back.

Printed per sample: images/s at each worker count, CPU-ms per image (this process plus the
workers, so the process pool's pickling shows), and an Amdahl estimate for 16 workers from the
measured 1 -> N scaling: serial fraction s = (N / S_N - 1) / (N - 1), estimate
r1 / (s + (1 - s) / 16). Threads stop scaling at the GIL-held share of a decode (pydicom's
parsing, the Python glue); processes only at cores and IPC. The estimate needs an idle machine
with at least N cores: on the 2-core development machine only 1-2 workers are measurable and
other jobs share those cores, so its 16-worker figures are an extrapolation, not a measurement.

    .venv/bin/python benchmarks/decode_scaling.py                      # 1..cores workers
    .venv/bin/python benchmarks/decode_scaling.py --workers 1,2,4,8,16 --seconds 2
    .venv/bin/python benchmarks/decode_scaling.py --only PNG,JPEG2000  # a subset of the rows
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from decode_bench import collect_samples  # type: ignore[import-not-found]  # noqa: E402

from app.card import InputSpec  # noqa: E402
from app.imaging.prepare import DecodeProcesses, _prepare_in_worker, prepare_input  # noqa: E402

SPEC = InputSpec(height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
MAX_PIXELS = 60_000_000


def _cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of this process and ``pids`` (Linux /proc; 0 where unreadable)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def _thread_task(data: bytes) -> object:
    return prepare_input(data, None, SPEC, MAX_PIXELS, keep_pixels=False)


def measure(
    submit: Callable[[bytes], Future], data: bytes, workers: int, seconds: float, pids: list[int]
) -> tuple[float, float]:
    """(images/s, CPU-ms per image) with ``2 x workers`` tasks in flight for ``seconds``."""
    for f in [submit(data) for _ in range(workers)]:  # warm every worker on this sample
        f.result()
    start, cpu0 = time.perf_counter(), _cpu_of(pids)
    pending = {submit(data) for _ in range(2 * workers)}
    done_count = 0
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            f.result()
            done_count += 1
        if time.perf_counter() - start < seconds or done_count < 2 * workers:
            pending |= {submit(data) for _ in done}
    elapsed = time.perf_counter() - start
    return done_count / elapsed, 1000 * (_cpu_of(pids) - cpu0) / done_count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    p.add_argument("--workers", help="comma list (default 1..os.cpu_count())")
    p.add_argument("--seconds", type=float, default=1.5, help="window per cell (default 1.5)")
    p.add_argument("--modes", default="threads,processes")
    p.add_argument("--only", help="comma list of substrings of the encoding column to keep")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    workers = (
        [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, cores + 1))
    )
    modes = args.modes.split(",")
    samples = collect_samples(args.data_dir)
    if args.only:
        keep = [k.strip().lower() for k in args.only.split(",")]
        samples = [s for s in samples if any(k in s[1].lower() for k in keep)]
    if not samples:
        print(f"no samples under {args.data_dir} (set CXR_DATA_DIR)")
        return 2
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"{cores} CPUs, load avg {' '.join(load0)}; workers {workers}; ~{args.seconds:g} s per "
        f"cell; request path prepare_input(keep_pixels=False) to {SPEC.height}x{SPEC.width}"
    )

    results: dict[tuple[int, str, int], tuple[float, float]] = {}
    for mode in modes:
        for w in workers:
            pool: Executor | DecodeProcesses
            if mode == "threads":
                pool = ThreadPoolExecutor(w)
                pids: list[int] = []

                def submit(data: bytes, pool: Executor = pool) -> Future:
                    return pool.submit(_thread_task, data)

            else:
                pool = DecodeProcesses(w)
                pids = sorted(set(pool.warm_up()))
                executor = pool._executor

                def submit(data: bytes, executor: Executor = executor) -> Future:
                    return executor.submit(_prepare_in_worker, data, None, SPEC, MAX_PIXELS)

            try:
                for i, (_, encoding, data, _) in enumerate(samples):
                    results[i, mode, w] = measure(submit, data, w, args.seconds, pids)
                    print(
                        f"  {mode:<9} {w:>2} workers  {encoding[:40]:<40} "
                        f"{results[i, mode, w][0]:8.1f} img/s",
                        flush=True,
                    )
            finally:
                pool.shutdown()

    top = max(workers)
    head = "".join(f" {m[0]}{w:<6}" for m in modes for w in workers)
    print(
        f"\nimages/s by workers (t = threads, p = processes); CPU-ms/img at 1 worker; "
        f"x = scaling 1 -> {top}; est16 = Amdahl estimate for 16 workers\n"
        f"{'file':<30} {'encoding':<34}{head} "
        + "".join(f" {m[0]}cpu  {m[0]}x    {m[0]}est16 " for m in modes)
    )
    for i, (name, encoding, _, synthetic) in enumerate(samples):
        cells = "".join(f" {results[i, m, w][0]:<7.1f}" for m in modes for w in workers)
        extra = ""
        for m in modes:
            r1, cpu1 = results[i, m, workers[0]]
            rn = results[i, m, top][0]
            scale = rn / r1 if r1 else float("nan")
            n = top / workers[0]
            if n > 1:
                serial = min(1.0, max(0.0, (n / scale - 1) / (n - 1)))
                est = r1 * 16 / workers[0] / (serial * 16 + (1 - serial))
            else:
                est = float("nan")
            extra += f" {cpu1:<5.1f} {scale:<5.2f} {est:<7.1f} "
        label = name + (" *" if synthetic else "")
        print(f"{label[:30]:<30} {encoding[:34]:<34}{cells}{extra}")
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\nload avg at the end {' '.join(load1)}; * = in-memory re-encoding of a real NIH image. "
        f"With {cores} cores shared with other jobs the 16-worker estimate is an Amdahl "
        "extrapolation from the measured scaling, not a measurement."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
