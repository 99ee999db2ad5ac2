"""The FastAPI service: ``create_app()`` builds it; uvicorn runs ``--factory app.main:create_app``.

A request's path: the upload is read (multipart field ``file`` or a raw body), decoded and
preprocessed in a thread pool, queued for the micro-batcher, run with the other images of its
batch, and answered in DESIGN.md's JSON. Every error is problem+json; a bad upload is a 4xx that
touches nothing shared, so the next request is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, Depends, FastAPI
from fastapi import params as fastapi_params
from fastapi.responses import Response

from app import __version__
from app.api.docs import install_docs
from app.api.errors import install_problem_handlers
from app.api.limits import (
    MIB,
    DeadlineMiddleware,
    Drain,
    DrainMiddleware,
    UploadLimitMiddleware,
)
from app.api.ops import healthz, metrics_endpoint, model_info, readyz
from app.api.predict import PREDICT_OPENAPI, PREDICT_PATH, predict
from app.api.schemas import (
    Health,
    ModelInfo,
    PredictResponse,
    Readiness,
    problem_responses,
)
from app.api.security import ApiKeyAuth, require_api_key, require_metrics_key
from app.api.studies import StudyResponse, get_study
from app.imaging.prepare import DecodeProcesses, decode_processes_for
from app.inference.batcher import MicroBatcher
from app.inference.runtime import ModelRuntime
from app.ops.audit import AuditLog, AuditMiddleware
from app.ops.logs import RequestIdMiddleware, configure_logging
from app.ops.metrics import Metrics, RequestMetricsMiddleware
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def settings_of(app: FastAPI) -> Settings:
    """The settings the routes see: ``dependency_overrides[get_settings]`` wins, as in routes."""
    provider: Callable[[], Settings] = app.dependency_overrides.get(get_settings, get_settings)
    return provider()


def streams_for(settings: Settings) -> int:
    """``CXR_INFERENCE_STREAMS``: 'auto' is one stream per intra-op thread (at most 8); the
    runtime ignores it on CUDA, where one stream of batches keeps the GPU busy."""
    if settings.inference_streams != "auto":
        return settings.inference_streams
    return max(1, min(8, settings.intra_op_threads))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm the model, then start the decode pool and the batcher; stop them after.

    Loading fails loudly (uvicorn exits) rather than serving a model that does not fit its card.
    """
    settings = settings_of(app)
    audit: AuditLog = app.state.audit
    await asyncio.to_thread(audit.start)
    runtime = await asyncio.to_thread(
        ModelRuntime.load,
        settings.model_dir,
        providers=settings.providers,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.ort_spinning,
        streams=streams_for(settings),
    )
    await asyncio.to_thread(runtime.warm_up, (1, settings.max_batch_size))
    max_batch = settings.max_batch_size
    if settings.batch_probe and max_batch > 1:
        max_batch = await asyncio.to_thread(runtime.probe_batch_size, max_batch)
    app.state.metrics.set_model(runtime.card.name, runtime.card.version)
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="cxr-decode")
    # Worker processes for no-heatmap uploads on many-core GPU hosts (CXR_DECODE_PROCESSES).
    n_processes = decode_processes_for(settings.decode_processes, runtime.device)
    processes = DecodeProcesses(n_processes) if n_processes else None
    if processes is not None:
        await asyncio.to_thread(processes.warm_up)
        logger.info("decoding in %d worker processes beside the threads", n_processes)
    app.state.decode_processes = processes
    batcher = MicroBatcher(
        runtime.run,
        max_batch_size=max_batch,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue_size=settings.max_queue_size,
        metrics=app.state.metrics,
        streams=runtime.streams,
        concurrent_run=partial(runtime.run, concurrent=True),
    )
    await batcher.start()
    app.state.runtime, app.state.batcher, app.state.decode_pool = runtime, batcher, pool
    pacs = None
    if settings.pacs_enabled:
        # DICOM in and out (app/pacs): the SCP, the study assembler and the outbox.
        from app.pacs.service import PacsService

        try:
            pacs = PacsService(
                settings,
                runtime,
                batcher,
                pool,
                audit=audit if audit.enabled else None,
                metrics=app.state.pacs_metrics,
                registry=app.state.metrics.registry,
            )
            await pacs.start()
        except BaseException:
            await batcher.stop(timeout_s=1.0)
            pool.shutdown(wait=False, cancel_futures=True)
            if processes is not None:
                processes.shutdown()
            raise
        app.state.pacs = pacs
    drain: Drain = app.state.drain
    drain.draining = False
    # SIGTERM: /readyz and new /predict answer 503 while admitted requests finish; then uvicorn
    # stops listening, waits for connections and runs the shutdown below.
    uninstall_sigterm = drain.install_sigterm(
        delay_s=settings.drain_delay_s, max_wait_s=settings.request_timeout_s
    )
    logger.info("ready: %s %s on %s", runtime.card.name, runtime.card.version, runtime.provider)
    try:
        yield
    finally:
        drain.draining = True
        uninstall_sigterm()
        if pacs is not None:
            # Before the batcher: no study may be left waiting on a stopped batcher.
            app.state.pacs = None
            await pacs.stop()
        await batcher.stop(timeout_s=settings.request_timeout_s)
        pool.shutdown(wait=True, cancel_futures=True)
        app.state.batcher = app.state.decode_pool = app.state.decode_processes = None
        if processes is not None:
            await asyncio.to_thread(processes.shutdown)
        # Every request has been answered (and recorded) by now: write the audit rows left.
        await asyncio.to_thread(audit.close)


def protected_dependencies(settings: Settings) -> Sequence[fastapi_params.Depends]:
    """Dependencies of the routes that use the model (/predict, /v1/model): an API key when
    keys are configured (left out otherwise, so /docs shows no Authorize button then)."""
    return [Depends(require_api_key)] if (settings.api_keys or "").strip() else []


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. ``settings`` (else the environment's) is what every route sees."""
    app = FastAPI(
        title="cxr-triage",
        version=__version__,
        summary="Chest X-ray triage over ONNX Runtime. Not a medical device.",
        description=(
            "Post a chest radiograph (PNG, JPEG or DICOM) to `/predict` and get per-pathology "
            "probabilities, screening and diagnosis flags from the model card's thresholds, a "
            "triage summary and optionally an attention heatmap. Errors are RFC 9457 "
            "`application/problem+json`."
        ),
        lifespan=lifespan,
        # /docs and /redoc come from install_docs: files shipped with the service, no CDN.
        docs_url=None,
        redoc_url=None,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    effective = settings_of(app)
    configure_logging(effective)
    app.state.auth = ApiKeyAuth.from_settings(effective)
    app.state.metrics = Metrics()
    app.state.runtime = None
    app.state.batcher = None
    app.state.decode_pool = None
    app.state.decode_processes = None
    app.state.audit = AuditLog(effective.audit_db)
    app.state.drain = Drain()
    app.state.pacs = None
    app.state.pacs_metrics = None
    if effective.pacs_enabled:
        from app.pacs.service import PacsMetrics

        app.state.pacs_metrics = PacsMetrics(app.state.metrics.registry)

    install_problem_handlers(app)
    install_docs(app)

    model_routes = APIRouter(dependencies=list(protected_dependencies(effective)))
    model_routes.add_api_route(
        PREDICT_PATH,
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=problem_responses(400, 401, 413, 415, 422, 500, 503, 504),
        openapi_extra=PREDICT_OPENAPI,
        tags=["prediction"],
    )
    model_routes.add_api_route(
        "/v1/model",
        model_info,
        methods=["GET"],
        response_model=ModelInfo,
        responses=problem_responses(401, 503),
        tags=["model"],
    )
    if effective.pacs_enabled:
        from app.pacs.stow import STOW_OPENAPI, stow

        for path in ("/dicomweb/studies", "/dicomweb/studies/{study}"):
            model_routes.add_api_route(
                path,
                stow,
                methods=["POST"],
                response_class=Response,
                responses=problem_responses(400, 401, 413, 415, 503),
                openapi_extra=STOW_OPENAPI,
                tags=["pacs"],
                summary="Store instances (STOW-RS)",
            )
        model_routes.add_api_route(
            "/v1/studies/{study_instance_uid}",
            get_study,
            methods=["GET"],
            response_model=StudyResponse,
            responses=problem_responses(401, 404, 503),
            tags=["pacs"],
        )
    open_routes = APIRouter(tags=["operations"])
    open_routes.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health)
    open_routes.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Readiness,
        responses=problem_responses(503),
    )
    metrics_keyed = app.state.auth.enabled and effective.metrics_require_key
    open_routes.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"},
            **(problem_responses(401) if metrics_keyed else {}),
        },
        dependencies=[Depends(require_metrics_key)] if metrics_keyed else [],
    )
    app.include_router(model_routes)
    app.include_router(open_routes)

    # Outermost last: request id > audit > metrics > drain gate > deadline > upload limit.
    app.add_middleware(UploadLimitMiddleware, max_bytes=int(effective.max_upload_mb * MIB))
    app.add_middleware(DeadlineMiddleware, timeout_s=effective.request_timeout_s)
    app.add_middleware(DrainMiddleware, drain=app.state.drain, paths=(PREDICT_PATH,))
    app.add_middleware(
        RequestMetricsMiddleware, metrics=app.state.metrics, paths=frozenset({PREDICT_PATH})
    )
    app.add_middleware(AuditMiddleware, audit=app.state.audit, paths=(PREDICT_PATH,))
    app.add_middleware(RequestIdMiddleware)
    return app
