"""The asyncio micro-batcher: many single-image requests, few session runs.

Requests arrive already decoded (in the decode thread pool) as ``[3, H, W]`` float32 arrays and
wait on a bounded queue. One batcher task takes the first waiting image, adds whatever else is
already queued, and waits up to ``max_batch_delay_ms`` for more only while more is known to be on
its way (requests admitted but still decoding): a request alone goes straight through, and a burst
still fills a batch. The batch runs in a worker thread, so the event loop keeps serving uploads
while ONNX Runtime computes.

With ``streams`` > 1 (CPU, ``CXR_INFERENCE_STREAMS``) up to that many batches run at once on
``concurrent_run`` (a session with fewer threads per run) while work is backed up; a batch that
finds nothing else running, queued or decoding runs alone on ``run`` with every thread, so a
single request keeps the lowest latency.

Failure isolation: a request whose client went away (cancelled future) is dropped before the run
or ignored after it; an exception in a run fails only that batch's requests with a 500 problem,
and the batcher carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.api.problems import Problem
from app.ops.metrics import Metrics

logger = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's share of a session run."""

    logits: np.ndarray
    heatmap: np.ndarray
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass(slots=True)
class _Item:
    pixels: np.ndarray
    future: asyncio.Future[BatchResult]
    enqueued: float
    slot: Slot


class QueueFull(Problem):
    """503: the backlog is at ``max_queue_size``; the client should retry shortly."""

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(
            503,
            detail,
            slug="queue-full",
            title="Service Unavailable",
            headers={"Retry-After": str(retry_after_s)},
        )


class NotAccepting(Problem):
    """503: the batcher is not running (starting up or shutting down)."""

    def __init__(self, detail: str = "The service is not accepting work right now.") -> None:
        super().__init__(
            503,
            detail,
            slug="not-ready",
            title="Service Unavailable",
            headers={"Retry-After": "5"},
        )


class MicroBatcher:
    """Collects single images into batches for one ``run`` function."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 8,
        max_batch_delay_ms: float = 2.0,
        max_queue_size: int = 64,
        metrics: Metrics | None = None,
        streams: int = 1,
        concurrent_run: RunFn | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_delay_ms < 0 or streams < 1:
            raise ValueError("batch size, queue size and streams must be >= 1, delay >= 0")
        if streams > 1 and concurrent_run is None:
            raise ValueError("streams > 1 needs a concurrent_run")
        self._run = run
        self._concurrent_run = concurrent_run or run
        self.streams = streams
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches dispatched and not finished
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._admitted = 0  # backlog: admitted and not yet taken into a batch
        self._incoming = 0  # admitted but not yet on the queue (still decoding)
        self._pending = 0  # on the queue or in the running batch
        self._accepting = False
        self.batches_run = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher task; call from the running event loop."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._free = asyncio.Semaphore(self.streams)
        self._executor = ThreadPoolExecutor(
            max_workers=self.streams, thread_name_prefix="cxr-infer"
        )
        self._task = asyncio.create_task(self._loop(), name="cxr-batcher")
        self._accepting = True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, finish the admitted ones (up to ``timeout_s``), then stop.

        Requests already admitted (still decoding, queued or running) are answered; only what is
        left after the timeout fails, with a 503.
        """
        self._accepting = False
        if self._task is None or self._queue is None:
            return
        deadline = time.perf_counter() + timeout_s
        while (self._incoming or self._pending) and not self._task.done():
            if time.perf_counter() > deadline:
                logger.warning(
                    "batcher stop: %d images unfinished after %.0fs; failing them",
                    self._incoming + self._pending,
                    timeout_s,
                )
                break
            await asyncio.sleep(0.005)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(NotAccepting("The service shut down before this ran."))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def accepting(self) -> bool:
        """Whether new requests are admitted (false before start and once stopping)."""
        return self._accepting and self._alive

    @property
    def _alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Images waiting on the queue (not counting the batch now running)."""
        return 0 if self._queue is None else self._queue.qsize()

    # -- request side --------------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self) -> Iterator[Slot]:
        """Reserve a backlog slot before decoding, so overload is refused before spending CPU.

        The slot counts against ``max_queue_size`` from admission until its image is taken into
        a batch (or the block exits); while it is still decoding, the batcher knows more work is
        on its way and may wait for it to fill a batch.
        """
        if not self.accepting:
            raise NotAccepting()
        if self._admitted >= self.max_queue_size:
            raise QueueFull(
                f"{self._admitted} images are already waiting (limit {self.max_queue_size}); "
                "retry shortly."
            )
        slot = Slot(self)
        self._admitted += 1
        self._incoming += 1
        try:
            yield slot
        finally:
            slot._leave_incoming()
            slot._release()

    async def submit(self, pixels: np.ndarray) -> BatchResult:
        """Admit and queue one image in one step (when there is no decoding to overlap)."""
        with self.admit() as slot:
            return await slot.submit(pixels)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.depth)

    # -- batcher side --------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._queue is not None and self._free is not None
        queue, free = self._queue, self._free
        while True:
            await free.acquire()  # a free stream first, so a batch forms from the latest queue
            try:
                first = await queue.get()
            except asyncio.CancelledError:
                free.release()
                raise
            batch = [first]
            first.slot._release()
            deadline = first.enqueued + self.max_batch_delay_s
            while len(batch) < self.max_batch_size:
                if not queue.empty():
                    item = queue.get_nowait()
                elif self._incoming == 0:
                    break  # nothing is on its way: waiting would only add latency
                else:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                item.slot._release()
                batch.append(item)
            self._set_depth()
            # With one stream the semaphore makes this one batch at a time, and run is the only
            # run function; with more, only a batch with nothing beside it gets every thread.
            alone = not self._running and queue.empty() and self._incoming == 0
            run = self._run if alone else self._concurrent_run
            self._running.add(asyncio.create_task(self._dispatch(batch, run)))

    async def _dispatch(self, batch: list[_Item], run: RunFn) -> None:
        """Run one batch, then free its stream (removed from ``_running`` before the next
        batch can be judged alone, not in a later done-callback)."""
        assert self._free is not None
        try:
            await self._run_batch(batch, run)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._pending -= len(batch)
            self._free.release()

    @staticmethod
    def _timed_run(run: RunFn, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        start = time.perf_counter()
        logits, heatmap = run(batch)
        return logits, heatmap, start, time.perf_counter()

    async def _run_batch(self, batch: list[_Item], run: RunFn) -> None:
        live = [item for item in batch if not item.future.done()]
        if not live:
            return
        n = len(live)
        loop = asyncio.get_running_loop()
        try:
            # A lone image needs no stacking copy: a leading axis is a view.
            pixels = live[0].pixels[None] if n == 1 else np.stack([item.pixels for item in live])
            logits, heatmap, start, end = await loop.run_in_executor(
                self._executor, self._timed_run, run, pixels
            )
            if len(logits) != n or len(heatmap) != n:
                raise RuntimeError(f"model returned {len(logits)}/{len(heatmap)} rows for {n}")
        except asyncio.CancelledError:
            for item in live:
                if not item.future.done():
                    item.future.set_exception(NotAccepting("The service shut down mid-batch."))
            raise
        except Exception:
            logger.exception("session run failed for a batch of %d", n)
            for item in live:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed())
            return
        self.batches_run += 1
        inference_ms = 1000.0 * (end - start)
        if self._metrics is not None:
            self._metrics.batch_size.observe(n)
            self._metrics.inference_duration.observe(end - start)
        for i, item in enumerate(live):
            if not item.future.done():
                item.future.set_result(
                    BatchResult(
                        logits=logits[i],
                        heatmap=heatmap[i],
                        queue_ms=1000.0 * max(0.0, start - item.enqueued),
                        inference_ms=inference_ms,
                        batch_size=n,
                    )
                )


class InferenceFailed(Problem):
    """500: the session run failed; only this batch's requests see it."""

    def __init__(self) -> None:
        super().__init__(
            500,
            "The model failed on this batch; the service is still up, retry the request.",
            slug="inference-failed",
        )


class Slot:
    """One admitted request's place in the backlog; see :meth:`MicroBatcher.admit`."""

    __slots__ = ("_batcher", "_incoming", "_released", "_submitted")

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._incoming = True
        self._released = False
        self._submitted = False

    def _leave_incoming(self) -> None:
        if self._incoming:
            self._incoming = False
            self._batcher._incoming -= 1

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._admitted -= 1

    async def submit(self, pixels: np.ndarray) -> BatchResult:
        """Queue this slot's ``[3,H,W]`` float32 image and wait for its result."""
        if self._submitted:
            raise RuntimeError("a slot takes one image")
        self._submitted = True
        self._leave_incoming()
        batcher = self._batcher
        if not batcher._alive or batcher._queue is None:
            raise NotAccepting()
        loop = asyncio.get_running_loop()
        item = _Item(
            pixels=pixels, future=loop.create_future(), enqueued=time.perf_counter(), slot=self
        )
        try:
            batcher._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(
                f"The queue is full ({batcher.max_queue_size}); retry shortly."
            ) from None
        batcher._pending += 1
        batcher._set_depth()
        return await item.future
