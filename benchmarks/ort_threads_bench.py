"""Raw ONNX Runtime on CPU: what the service's inference streams and spinning settings rest on.

(a) throughput of one run at a time on all ``--threads`` intra-op threads against ``--threads``
    runs side by side on a one-thread session (what ``CXR_INFERENCE_STREAMS`` does under load);
(b) CPU used in the idle ``--idle-ms`` after a run: spinning on (ORT's default), spinning on with
    ``session.force_spinning_stop`` (the service's default) and spinning off.

Each configuration runs in its own child process, in rounds, so one session's spinning threads
never share the cores with another's measurement. Uses the serve_bench ViT-B/16 cache unless
``--model`` names another ``model.onnx``.

    .venv/bin/python benchmarks/ort_threads_bench.py              # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "benchmarks" / "cache" / "vit_b16" / "model.onnx"


def child(model: str, kind: str, threads: int, images: int, idle_ms: float) -> dict[str, float]:
    """One measurement in this process: ``streams`` / ``one`` throughput, or idle CPU."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from app.inference.runtime import session_options

    spinning = kind not in ("idle-nospin",)
    intra = 1 if kind == "streams" else threads
    opts = session_options(intra, allow_spinning=spinning)
    if kind == "idle-spin":  # ORT's own default: spin on, no stop after the run
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    if kind.startswith("idle"):
        idle = []
        for _ in range(5):
            session.run(None, feed)
            cpu = time.process_time()
            time.sleep(idle_ms / 1000)  # the idle window being measured, not a synchronisation
            idle.append(1000 * (time.process_time() - cpu))
        return {"idle_cpu_ms": statistics.median(idle)}
    streams = threads if kind == "streams" else 1
    per = max(1, images // streams)

    def work() -> None:
        for _ in range(per):
            session.run(None, feed)

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"img_s": streams * per / (time.perf_counter() - start)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model.onnx (batch 1 is run)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--images", type=int, default=8, help="images per throughput window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle-ms", type=float, default=300.0)
    p.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = child(args.model, args.child[0], args.threads, args.images, args.idle_ms)
        print(json.dumps(out))
        return 0
    if not Path(args.model).is_file():
        print(f"{args.model} not found: run benchmarks/serve_bench.py once (it builds the cache)")
        return 1
    kinds = ["one", "streams", "idle-spin", "idle-spin-stop", "idle-nospin"]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            argv = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads)]
            argv += ["--images", str(args.images), "--idle-ms", str(args.idle_ms), "--child", kind]
            line = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            value = next(iter(json.loads(line.strip().splitlines()[-1]).values()))
            results[kind].append(value)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items())
        )
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"model {args.model}, {args.threads} threads, batch 1, median of {args.rounds} rounds")
    print(
        f"(a) one run at a time on {args.threads} threads: {med['one']:.2f} img/s; "
        f"{args.threads} one-thread runs side by side: {med['streams']:.2f} img/s "
        f"({med['streams'] / med['one']:.2f} x)"
    )
    print(
        f"(b) CPU in the {args.idle_ms:.0f} ms after a run: spinning (ORT default) "
        f"{med['idle-spin']:.0f} ms, spinning + force_spinning_stop (service) "
        f"{med['idle-spin-stop']:.0f} ms, spinning off {med['idle-nospin']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
