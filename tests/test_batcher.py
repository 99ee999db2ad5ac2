"""The micro-batcher with a real ONNX session: batching, latency of a lone request, backpressure,
failure isolation, cancelled clients and draining on stop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from app.inference.batcher import (
    BatchResult,
    InferenceFailed,
    MicroBatcher,
    NotAccepting,
    QueueFull,
)
from app.inference.runtime import ModelRuntime
from app.ops.metrics import Metrics

# Only a hang reaches this: each wait below ends on an event or a condition long before.
HANG_S = 120.0
# A batch delay no machine reaches by being slow: a test that sees a batch run "early" proves
# the batcher did not wait for the delay, without a bound on how long anything took.
FOREVER_MS = 600_000.0


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> ModelRuntime:
    rt = ModelRuntime.load(tiny_model_dir, providers="cpu", intra_op_threads=1)
    rt.warm_up((1,))
    return rt


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 48, 64)).astype(np.float32) for _ in range(n)]


class Recorder:
    """Wraps the session's run to record batch sizes, optionally held at a gate."""

    def __init__(self, runtime: ModelRuntime, gate: threading.Event | None = None) -> None:
        self.runtime = runtime
        self.gate = gate
        self.sizes: list[int] = []
        self.started = threading.Event()  # a session run has begun (and may be held)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(HANG_S)
        self.sizes.append(len(batch))
        if np.isnan(batch).any():
            raise ValueError("NaN input")
        return self.runtime.run(batch)


def run_with(batcher: MicroBatcher, body: Callable[[MicroBatcher], Awaitable[object]]) -> object:
    async def main() -> object:
        await batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop(timeout_s=5)

    return asyncio.run(main())


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``condition`` holds (fail naming ``what`` if it never does)."""
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.001)


def test_concurrent_submissions_share_runs_and_keep_their_answers(runtime) -> None:
    rec = Recorder(runtime)
    metrics = Metrics()
    batcher = MicroBatcher(rec, max_batch_size=4, max_batch_delay_ms=20, metrics=metrics)
    xs = images(10)

    async def body(b: MicroBatcher) -> list[BatchResult]:
        return await asyncio.gather(*(b.submit(x) for x in xs))

    results = run_with(batcher, body)
    assert sum(rec.sizes) == 10
    assert max(rec.sizes) == 4
    assert len(rec.sizes) == 3
    for x, res in zip(xs, results, strict=True):  # type: ignore[call-overload]
        logits, heatmap = runtime.run(x[None])
        np.testing.assert_allclose(res.logits, logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.heatmap, heatmap[0], rtol=1e-5, atol=1e-5)
        assert res.batch_size in rec.sizes
        assert res.inference_ms > 0
    registry = metrics.registry
    assert registry.get_sample_value("cxr_batch_size_count") == 3
    assert registry.get_sample_value("cxr_batch_size_sum") == 10
    assert registry.get_sample_value("cxr_inference_duration_seconds_count") == 3
    assert registry.get_sample_value("cxr_queue_depth") == 0


def test_a_lone_request_does_not_wait_for_the_batch_delay(runtime) -> None:
    """With a ten-minute delay and nothing else on its way, a lone image still runs at once."""
    rec = Recorder(runtime)
    batcher = MicroBatcher(rec, max_batch_delay_ms=FOREVER_MS)

    async def body(b: MicroBatcher) -> BatchResult:
        return await asyncio.wait_for(b.submit(images(1)[0]), HANG_S)

    result = run_with(batcher, body)
    assert isinstance(result, BatchResult) and result.batch_size == 1
    assert rec.sizes == [1]


def test_waits_for_requests_still_decoding(runtime) -> None:
    """An admitted request that is still decoding is worth waiting for, up to the delay."""
    rec = Recorder(runtime)
    batcher = MicroBatcher(rec, max_batch_size=8, max_batch_delay_ms=FOREVER_MS)
    a, b = images(2)

    async def body(bt: MicroBatcher) -> tuple[BatchResult, BatchResult]:
        with bt.admit() as first, bt.admit() as second:
            t1 = asyncio.create_task(first.submit(a))
            # The batcher has taken the first image and is waiting while the second "decodes".
            await until(lambda: bt._pending == 1 and bt.depth == 0, "the first image taken")
            t2 = asyncio.create_task(second.submit(b))
            return await asyncio.wait_for(t1, HANG_S), await asyncio.wait_for(t2, HANG_S)

    r1, r2 = run_with(batcher, body)  # type: ignore[misc]
    assert rec.sizes == [2]
    assert r1.batch_size == r2.batch_size == 2
    assert r1.queue_ms > r2.queue_ms  # the first waited for the second, not the other way


def test_full_backlog_is_503_with_retry_after(runtime) -> None:
    batcher = MicroBatcher(Recorder(runtime), max_queue_size=2)

    async def body(b: MicroBatcher) -> None:
        with b.admit(), b.admit():
            with pytest.raises(QueueFull) as err, b.admit():
                pass
            assert err.value.status == 503
            assert int(err.value.headers["Retry-After"]) >= 1
        with b.admit():  # slots come back when their requests finish
            pass

    run_with(batcher, body)


def test_a_failing_run_fails_only_its_batch(runtime) -> None:
    rec = Recorder(runtime)
    batcher = MicroBatcher(rec, max_batch_size=4, max_batch_delay_ms=0)
    good, bad = images(2)
    bad[0, 0, 0] = np.nan

    async def body(b: MicroBatcher) -> BatchResult:
        with pytest.raises(InferenceFailed) as err:
            await b.submit(bad)
        assert err.value.status == 500
        assert "NaN" not in err.value.detail  # internals stay in the log
        assert b.accepting
        return await b.submit(good)

    result = run_with(batcher, body)
    assert isinstance(result, BatchResult)
    assert rec.sizes == [1, 1]


def test_a_model_returning_wrong_rows_fails_the_batch(runtime) -> None:
    def short(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, heatmap = runtime.run(batch)
        return logits[:-1], heatmap[:-1]

    batcher = MicroBatcher(short)

    async def body(b: MicroBatcher) -> None:
        with pytest.raises(InferenceFailed):
            await b.submit(images(1)[0])

    run_with(batcher, body)


def test_images_that_cannot_be_stacked_fail_their_batch_only(runtime) -> None:
    batcher = MicroBatcher(Recorder(runtime), max_batch_size=4, max_batch_delay_ms=0)

    async def body(b: MicroBatcher) -> BatchResult:
        odd = np.zeros((3, 8, 8), np.float32)
        results = await asyncio.gather(
            b.submit(images(1)[0]), b.submit(odd), return_exceptions=True
        )
        assert all(isinstance(r, InferenceFailed) for r in results)
        assert b.accepting
        return await b.submit(images(1)[0])

    assert isinstance(run_with(batcher, body), BatchResult)


def test_cancelled_requests_do_not_break_the_batch(runtime) -> None:
    gate = threading.Event()
    rec = Recorder(runtime, gate)
    batcher = MicroBatcher(rec, max_batch_size=8, max_batch_delay_ms=0)
    xa, xb, xc = images(3)

    async def body(b: MicroBatcher) -> tuple[BatchResult, BatchResult]:
        ta = asyncio.create_task(b.submit(xa))
        await until(rec.started.is_set, "A running, held at the gate")
        tb = asyncio.create_task(b.submit(xb))
        tc = asyncio.create_task(b.submit(xc))
        await until(lambda: b.depth == 2, "B and C queued behind A")
        tb.cancel()  # B's client went away while queued
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await tb
        return await ta, await tc

    ra, rc = run_with(batcher, body)  # type: ignore[misc]
    assert rec.sizes == [1, 1]  # B was dropped before its run, C still ran
    np.testing.assert_allclose(rc.logits, runtime.run(xc[None])[0][0], rtol=1e-5, atol=1e-5)
    assert ra.batch_size == rc.batch_size == 1


def test_stop_drains_admitted_work_then_refuses(runtime) -> None:
    gate = threading.Event()
    rec = Recorder(runtime, gate)
    batcher = MicroBatcher(rec, max_batch_size=2, max_batch_delay_ms=0)

    async def main() -> None:
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(x)) for x in images(5)]
        await until(rec.started.is_set, "the first batch running, held at the gate")
        assert batcher.depth == 3  # the other three wait behind it
        stopping = asyncio.create_task(batcher.stop(timeout_s=HANG_S))
        await until(lambda: not batcher.accepting, "stop() refusing new work")
        with pytest.raises(NotAccepting):
            await batcher.submit(images(1)[0])
        gate.set()
        await stopping
        results = await asyncio.gather(*tasks)
        assert all(isinstance(r, BatchResult) for r in results)

    asyncio.run(main())
    assert sum(rec.sizes) == 5


def test_submit_before_start_is_503() -> None:
    batcher = MicroBatcher(lambda b: (b, b))

    async def main() -> None:
        with pytest.raises(NotAccepting) as err:
            await batcher.submit(np.zeros((3, 2, 2), np.float32))
        assert err.value.status == 503

    asyncio.run(main())


class Active:
    """Counts session runs in progress across several run functions, each held at a gate."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def gated(self, gate: threading.Event) -> Recorder:
        outer = self

        class Counted(Recorder):
            def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                with outer.lock:
                    outer.now += 1
                    outer.most = max(outer.most, outer.now)
                try:
                    return super().__call__(batch)
                finally:
                    with outer.lock:
                        outer.now -= 1

        return Counted(self.runtime, gate)


def test_streams_run_backed_up_batches_side_by_side_and_a_lone_one_alone(runtime) -> None:
    """CXR_INFERENCE_STREAMS=2: the first request, finding nothing else, runs on ``run`` (all
    threads); requests queued behind it run on ``concurrent_run`` beside it, two at most."""
    active = Active(runtime)
    release = threading.Event()
    alone, side = active.gated(release), active.gated(release)
    batcher = MicroBatcher(alone, concurrent_run=side, streams=2, max_batch_size=1)
    xs = images(5)

    async def body(b: MicroBatcher) -> list[BatchResult]:
        first = asyncio.create_task(b.submit(xs[0]))
        await until(alone.started.is_set, "the lone request's run started")
        rest = [asyncio.create_task(b.submit(x)) for x in xs[1:]]
        await until(side.started.is_set, "a queued request ran beside the held one")
        assert alone.sizes == []  # the lone run is still held: the two overlap
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), HANG_S)

    results = run_with(batcher, body)
    assert active.most == 2
    assert alone.sizes[0] == 1 and sum(alone.sizes) + sum(side.sizes) == 5
    assert len(side.sizes) >= 3  # all but the first (and perhaps the last) were backed up
    for x, res in zip(xs, results, strict=True):  # type: ignore[call-overload]
        logits, _ = runtime.run(x[None])
        np.testing.assert_allclose(res.logits, logits[0], rtol=1e-5, atol=1e-5)


def test_streams_need_a_concurrent_run() -> None:
    with pytest.raises(ValueError, match="concurrent_run"):
        MicroBatcher(lambda b: (b, b), streams=2)


def test_the_batch_size_probe_picks_the_smallest_size_near_the_best() -> None:
    from app.inference.runtime import choose_batch_size

    assert choose_batch_size({1: 300.0, 2: 305.0, 4: 310.0, 8: 340.0}) == 1  # ViT-B/16 on CPU
    assert choose_batch_size({1: 14.0, 2: 9.0, 4: 7.1, 8: 6.9}) == 4  # a small CNN
    assert choose_batch_size({1: 9.0, 2: 4.6, 4: 2.3, 8: 1.1}) == 8  # a GPU
