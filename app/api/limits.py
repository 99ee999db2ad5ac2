"""Admission limits enforced below the framework: upload size (413), a per-request deadline
(504), and the drain gate of graceful shutdown (503).

All are pure ASGI middleware: the upload limit has to act before anything reads a body, and
each must answer with problem+json even when the route never gets to run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import Problem

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


class UploadTooLarge(Problem):
    """The request body is over ``CXR_MAX_UPLOAD_MB``."""

    def __init__(self, limit_bytes: int, size: int | None = None) -> None:
        said = f"{size / MIB:.1f} MiB" if size is not None else "more than that"
        super().__init__(
            413,
            f"The upload is {said}; the limit is {limit_bytes / MIB:g} MiB (CXR_MAX_UPLOAD_MB).",
            slug="upload-too-large",
            title="Content Too Large",
        )
        self.limit_bytes = limit_bytes


class UploadLimitMiddleware:
    """Reject request bodies over ``max_bytes`` with 413 without reading them in full.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read
    (a client that sent ``Expect: 100-continue`` gets the 413 instead of ``100 Continue`` and never
    sends the body). A chunked body is counted while the app reads it, and reading stops at the
    limit: the app's ``receive`` raises :class:`UploadTooLarge`, and whatever the app makes of
    that (FastAPI turns a failed form parse into a 400) is replaced by the 413.

    The connection stays usable: uvicorn discards the unread rest of the body after the response,
    so a client that writes its whole upload before reading still gets the 413 rather than a
    reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            problem = Problem(400, "The Content-Length header is not a number.", slug="bad-request")
            await _send_problem(problem, scope, send)
            return
        if declared is not None and declared > self.max_bytes:
            logger.info("upload refused", extra={"bytes": declared, "limit": self.max_bytes})
            await _send_problem(UploadTooLarge(self.max_bytes, declared), scope, send)
            return

        received = 0
        exceeded = False
        app_started = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise UploadTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    logger.info(
                        "upload cut off", extra={"bytes": received, "limit": self.max_bytes}
                    )
                    raise UploadTooLarge(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started, answered
            if exceeded and not app_started:
                if not answered:
                    answered = True
                    await _send_problem(UploadTooLarge(self.max_bytes), scope, send)
                return
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded or app_started:
                raise
        if exceeded and not app_started and not answered:
            await _send_problem(UploadTooLarge(self.max_bytes), scope, send)


class DeadlineMiddleware:
    """Answer 504 problem+json when a request has not started its response within ``timeout_s``.

    The route is cancelled at the deadline (its awaits raise ``CancelledError``, so the batcher
    must skip cancelled futures). Once a response has started, the deadline no longer applies: a
    half-sent body cannot become a 504.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        with anyio.CancelScope(deadline=anyio.current_time() + self.timeout_s) as cancel_scope:

            async def send_started(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    cancel_scope.deadline = math.inf
                await send(message)

            await self.app(scope, receive, send_started)

        if cancel_scope.cancelled_caught and not started:
            logger.warning(
                "request deadline passed",
                extra={"timeout_s": self.timeout_s, "path": scope.get("path")},
            )
            problem = Problem(
                504,
                f"The request did not finish within {self.timeout_s:g} s (CXR_REQUEST_TIMEOUT_S).",
                slug="deadline-exceeded",
            )
            await _send_problem(problem, scope, send)


class ShuttingDown(Problem):
    """503 while draining: the client should retry, on another instance or after the restart."""

    def __init__(self, retry_after_s: int = 5) -> None:
        super().__init__(
            503,
            "The service is shutting down; retry shortly.",
            slug="shutting-down",
            title="Service Unavailable",
            headers={"Retry-After": str(retry_after_s)},
        )


class Drain:
    """Graceful shutdown's admission gate: once draining, new work is refused, old work finishes.

    uvicorn on SIGTERM closes its listener at once, so without this a load balancer would see
    refused connections rather than a failing ``/readyz``, and a request arriving in the same
    instant would be cut off. :meth:`install_sigterm` puts a drain phase in front of uvicorn's
    own shutdown: ``/readyz`` and new ``/predict`` calls answer 503 while the requests already
    admitted finish; then uvicorn's handler runs (stop listening, wait for connections, lifespan
    shutdown, where the batcher is drained and the audit log flushed).
    """

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self) -> None:
        self.draining = True
        logger.info("draining: refusing new work", extra={"in_flight": self.in_flight})

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left (or ``timeout_s``); whether it got there."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.in_flight

    def install_sigterm(self, *, delay_s: float, max_wait_s: float) -> Callable[[], None]:
        """Run a drain phase on SIGTERM before the server's own SIGTERM handler; return undo.

        The drain lasts at least ``delay_s`` (time for load balancers to see ``/readyz`` fail)
        and at most until the admitted requests finish or ``max_wait_s`` passes. A second
        SIGTERM skips the rest of the drain. Signals belong to the main thread: anywhere else
        (a test client's portal thread) this installs nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def hand_over() -> None:
            if callable(previous):
                previous(signal.SIGTERM, None)
            else:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

        async def drain_then_hand_over() -> None:
            self.begin()
            started = time.monotonic()
            await asyncio.sleep(delay_s)
            finished = await self.wait_idle(max(0.0, max_wait_s - (time.monotonic() - started)))
            logger.info(
                "drained" if finished else "drain timed out",
                extra={
                    "in_flight": self.in_flight,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            hand_over()

        def start_drain() -> None:
            task = loop.create_task(drain_then_hand_over(), name="cxr-drain")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.draining:
                loop.call_soon_threadsafe(hand_over)
            else:
                self.draining = True  # at once: the drain task starts on the loop's next turn
                loop.call_soon_threadsafe(start_drain)

        signal.signal(signal.SIGTERM, on_sigterm)

        def uninstall() -> None:
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, previous)

        return uninstall


class DrainMiddleware:
    """Refuse new work with 503 while draining, and count the work in flight."""

    def __init__(self, app: ASGIApp, drain: Drain, paths: Sequence[str] = ("/predict",)) -> None:
        self.app = app
        self.drain = drain
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _send_problem(ShuttingDown(), scope, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


async def _send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    """Answer from middleware in the app's problem format, request id included."""

    async def no_receive() -> Message:
        return {"type": "http.disconnect"}

    extra = {}
    request_id = (scope.get("state") or {}).get("request_id")
    if request_id:
        extra["request_id"] = request_id
    await problem.to_response(**extra)(scope, no_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length, ``None`` when absent (chunked), ``-1`` when unparseable."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
