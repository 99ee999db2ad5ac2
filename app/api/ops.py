"""Probes, metrics and the model card: the routes operators and orchestrators call."""

from __future__ import annotations

import logging

import onnxruntime as ort
from fastapi import Depends, Request
from fastapi.responses import Response

from app.api.limits import (
    ShuttingDown,
)
from app.api.predict import ready_parts
from app.api.schemas import (
    Health,
    ModelInfo,
    ModelRef,
    Readiness,
    RuntimeInfo,
)
from app.inference.batcher import MicroBatcher, NotAccepting
from app.inference.runtime import ModelRuntime
from app.ops.metrics import Metrics
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)


async def healthz() -> Health:
    """The process is alive (says nothing about the model; see /readyz)."""
    return Health()


async def readyz(request: Request) -> Readiness:
    """200 once the model is loaded and warmed up and requests are accepted; else 503."""
    if request.app.state.drain.draining:
        raise ShuttingDown()
    runtime, _, _ = ready_parts(request)
    if not runtime.warmed_up:
        raise NotAccepting("The model is warming up.")
    return Readiness(
        model=ModelRef(name=runtime.card.name, version=runtime.card.version),
        provider=runtime.provider,
    )


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    metrics: Metrics = request.app.state.metrics
    batcher: MicroBatcher | None = request.app.state.batcher
    if batcher is not None:
        metrics.queue_depth.set(batcher.depth)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def model_info(request: Request, settings: Settings = Depends(get_settings)) -> ModelInfo:
    """The model card of the loaded model, and the execution provider it runs on."""
    runtime: ModelRuntime | None = request.app.state.runtime
    if runtime is None:
        raise NotAccepting("The model is not loaded yet.")
    info = RuntimeInfo(
        providers=runtime.providers,
        requested_providers=runtime.requested_providers,
        available_providers=ort.get_available_providers(),
        device=runtime.device,
        intra_op_threads=runtime.intra_op_threads,
        max_batch_size=request.app.state.batcher.max_batch_size,  # set with the runtime
        batch_probe_ms_per_image=runtime.batch_probe,
        inference_streams=runtime.streams,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue_size=settings.max_queue_size,
        heatmap_grid=runtime.heatmap_grid,
        warmed_up=runtime.warmed_up,
        load_seconds=round(runtime.load_seconds, 3),
    )
    return ModelInfo(**runtime.card.model_dump(), runtime=info)
