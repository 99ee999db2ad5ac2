"""Prometheus metrics, with the names DESIGN.md fixes.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` rather than the global
default one, so that tests (and a process that builds several apps) never collide on metric
names, and ``/metrics`` shows exactly this service's numbers.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets span a GPU batch (~ms) to a CPU ViT-B under load (seconds).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """The service's collectors on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "cxr_requests", "Prediction requests answered, by HTTP status", ["status"], registry=r
        )
        self.request_duration = Histogram(
            "cxr_request_duration_seconds",
            "Wall time of a prediction request, upload to response",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cxr_batch_size", "Images per session run", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "cxr_queue_depth", "Decoded images waiting for the batcher", registry=r
        )
        self.inference_duration = Histogram(
            "cxr_inference_duration_seconds",
            "Wall time of one session run (one batch)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_duration = Histogram(
            "cxr_decode_duration_seconds",
            "Decode and preprocessing time of one upload",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "cxr_model_info",
            "The loaded model (value is always 1)",
            ["name", "version"],
            registry=r,
        )

    def set_model(self, name: str, version: str) -> None:
        """Record the loaded model; one label set at a time."""
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Counts and times requests to the given paths, whatever ends them.

    A pure ASGI middleware (no ``BaseHTTPMiddleware`` overhead) so that rejections raised before
    the route runs (validation, auth, upload limits) are counted too.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests_total.labels(status=str(status)).inc()
            self.metrics.request_duration.observe(time.perf_counter() - start)
