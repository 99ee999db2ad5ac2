"""Request limits enforced below the framework: upload size (413) and a per-request deadline (504).

Both are pure ASGI middleware. The upload limit has to act before FastAPI reads a body (a form
field is parsed in full before a route runs), and both must answer with problem+json even when
the route never gets to run.
"""

from __future__ import annotations

import logging
import math

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.problems import Problem

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
            await problem.to_response()(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            logger.info("upload refused", extra={"bytes": declared, "limit": self.max_bytes})
            await UploadTooLarge(self.max_bytes, declared).to_response()(scope, receive, send)
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


async def _send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    async def no_receive() -> Message:
        return {"type": "http.disconnect"}

    await problem.to_response()(scope, no_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length, ``None`` when absent (chunked), ``-1`` when unparseable."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
