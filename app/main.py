"""The FastAPI service: ``create_app()`` builds it; uvicorn runs ``--factory app.main:create_app``.

A request's path: the upload is read (multipart field ``file`` or a raw body), decoded and
preprocessed in a thread pool, queued for the micro-batcher, run with the other images of its
batch, and answered in DESIGN.md's JSON. Every error is problem+json; a bad upload is a 4xx that
touches nothing shared, so the next request is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import params as fastapi_params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.audit import AuditLog, AuditMiddleware, entry_for
from app.batcher import MicroBatcher, NotAccepting
from app.card import ModelCard
from app.decode import DecodedImage, DecodeError, decode_image
from app.heatmap import overlay_png_base64
from app.labels import NO_FINDING
from app.limits import (
    MIB,
    DeadlineMiddleware,
    Drain,
    DrainMiddleware,
    ShuttingDown,
    UploadLimitMiddleware,
)
from app.logs import REQUEST_ID_HEADER, RequestIdMiddleware, configure_logging
from app.metrics import Metrics, RequestMetricsMiddleware
from app.preprocess import to_model_input
from app.problems import Problem
from app.runtime import ModelRuntime
from app.schemas import (
    DicomUIDs,
    Finding,
    Health,
    Heatmap,
    ModelInfo,
    ModelRef,
    PredictResponse,
    Readiness,
    RuntimeInfo,
    TimingMs,
    Triage,
    problem_responses,
)
from app.security import ApiKeyAuth, require_api_key, require_metrics_key
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)

RAW_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "application/dicom"})
# Generic types say nothing about the format: let the decoder sniff the bytes.
_SNIFF_MEDIA_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
PREDICT_PATH = "/predict"

_BINARY = {"type": "string", "format": "binary"}
_PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A PNG, JPEG or DICOM (Part 10 or raw dataset) chest radiograph.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {**_BINARY, "description": "PNG, JPEG or DICOM"}},
                }
            },
            **{media: {"schema": _BINARY} for media in sorted(RAW_MEDIA_TYPES)},
        },
    }
}


# -- request ids ---------------------------------------------------------------------------------
# app.logs.RequestIdMiddleware gives every request an id (the client's X-Request-ID when it is a
# plain token), in request.state, the log context and the response header.


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.state.request_id = uuid.uuid4().hex
    return rid


# -- errors --------------------------------------------------------------------------------------


def _problem_response(request: Request, problem: Problem) -> Response:
    response = problem.to_response(request_id=request_id_of(request))
    response.headers[REQUEST_ID_HEADER] = request_id_of(request)
    return response


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return _problem_response(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()
    ]
    detail = "Invalid request: " + "; ".join(errors) if errors else "Invalid request."
    return _problem_response(request, Problem(422, detail, slug="invalid-request"))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return _problem_response(request, Problem(exc.status_code, detail, headers=exc.headers))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error", exc_info=exc)
    problem = Problem(
        500,
        f"Internal error. Quote request id {request_id_of(request)} when reporting it.",
        slug="internal-error",
    )
    return _problem_response(request, problem)


# -- the prediction path -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    decoded: DecodedImage
    model_input: np.ndarray
    seconds: float


def prepare(data: bytes, content_type: str | None, card: ModelCard, max_pixels: int) -> Prepared:
    """Decode and preprocess one upload (runs in the decode pool, off the event loop)."""
    start = time.perf_counter()
    try:
        decoded = decode_image(data, content_type=content_type, max_pixels=max_pixels)
    except DecodeError:
        raise
    except Exception as exc:
        # decode_image promises DecodeError only; should a file still find a bug, the client
        # gets a 4xx for its bad upload and the traceback goes to the log, not to the client.
        logger.error("decoder raised %s", type(exc).__name__, exc_info=exc)
        raise Problem(422, "The image could not be decoded.", slug="undecodable-image") from exc
    model_input = np.ascontiguousarray(to_model_input(decoded.pixels, card.input), np.float32)
    expected = (3, card.input.height, card.input.width)
    if model_input.shape != expected:
        raise RuntimeError(f"preprocessing gave {model_input.shape}, expected {expected}")
    return Prepared(decoded, model_input, time.perf_counter() - start)


async def read_upload(request: Request) -> tuple[bytes, str | None]:
    """The uploaded bytes and a format hint, from multipart field ``file`` or a raw body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise Problem(
                    422,
                    "The multipart upload needs the image in a field named 'file'.",
                    slug="missing-file",
                )
            data = await upload.read()
            part_type = (upload.content_type or "").split(";")[0].strip().lower()
        hint = None if part_type in _SNIFF_MEDIA_TYPES else part_type
    elif media in RAW_MEDIA_TYPES or media in _SNIFF_MEDIA_TYPES - {""}:
        data = await request.body()
        hint = None if media in _SNIFF_MEDIA_TYPES else media
    else:
        raise Problem(
            415,
            "Send a PNG, JPEG or DICOM as multipart field 'file', or as the raw body with "
            f"Content-Type image/png, image/jpeg or application/dicom (got {media or 'none'}).",
            slug="unsupported-media-type",
        )
    if not data:
        raise Problem(400, "The upload is empty.", slug="empty-upload")
    return data, hint


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def score(card: ModelCard, logits: np.ndarray) -> tuple[list[Finding], Triage]:
    """Findings in model order and the triage summary (see docs/serving.md for "abnormal")."""
    probabilities = _sigmoid(logits)
    findings: list[Finding] = []
    for label, p in zip(card.labels, probabilities.tolist(), strict=True):
        s_thr = card.thresholds.screening[label].threshold
        d_thr = card.thresholds.diagnosis[label].threshold
        findings.append(
            Finding(
                label=label,
                probability=p,
                screening_threshold=s_thr,
                diagnosis_threshold=d_thr,
                screening_positive=p >= s_thr,
                diagnosis_positive=p >= d_thr,
            )
        )
    pathologies = [f for f in findings if f.label != NO_FINDING]
    diagnosis = [f.label for f in pathologies if f.diagnosis_positive]
    triage = Triage(
        screening_positive=[f.label for f in pathologies if f.screening_positive],
        diagnosis_positive=diagnosis,
        abnormal=bool(diagnosis),
    )
    return findings, triage


def _ready_parts(request: Request) -> tuple[ModelRuntime, MicroBatcher, ThreadPoolExecutor]:
    state = request.app.state
    runtime, batcher, pool = state.runtime, state.batcher, state.decode_pool
    if runtime is None or batcher is None or pool is None or not batcher.accepting:
        raise NotAccepting("The model is not loaded yet, or the service is shutting down.")
    return runtime, batcher, pool


async def predict(
    request: Request,
    heatmap: bool = Query(False, description="Also return the heatmap grid and a PNG overlay"),
    settings: Settings = Depends(get_settings),
) -> PredictResponse:
    """Score one chest radiograph (PNG, JPEG or DICOM)."""
    start = time.perf_counter()
    runtime, batcher, pool = _ready_parts(request)
    metrics: Metrics = request.app.state.metrics
    data, hint = await read_upload(request)
    loop = asyncio.get_running_loop()
    card = runtime.card
    audit = entry_for(request)
    if audit is not None:
        audit.note_model(card.name, card.version)
    with batcher.admit() as slot:
        prepared = await loop.run_in_executor(pool, prepare, data, hint, card, settings.max_pixels)
        del data
        if audit is not None:
            audit.note_image(prepared.decoded.source, prepared.decoded.dicom)
        metrics.decode_duration.observe(prepared.seconds)
        result = await slot.submit(prepared.model_input)
    findings, triage = score(card, result.logits)
    if audit is not None:
        audit.note_findings(triage.screening_positive, triage.diagnosis_positive, triage.abnormal)
    heatmap_out = None
    if heatmap:
        png = await loop.run_in_executor(
            pool, overlay_png_base64, prepared.model_input, card.input, result.heatmap
        )
        grid = np.round(result.heatmap.astype(np.float64), 4).tolist()
        heatmap_out = Heatmap(method=card.heatmap_method, grid=grid, png_base64=png)
    uids = prepared.decoded.dicom
    return PredictResponse(
        request_id=request_id_of(request),
        model=ModelRef(name=card.name, version=card.version),
        dicom=None
        if uids is None
        else DicomUIDs(
            study_instance_uid=uids.study_instance_uid,
            series_instance_uid=uids.series_instance_uid,
            sop_instance_uid=uids.sop_instance_uid,
        ),
        findings=findings,
        triage=triage,
        heatmap=heatmap_out,
        warnings=list(prepared.decoded.warnings),
        timing_ms=TimingMs(
            decode=round(1000.0 * prepared.seconds, 2),
            queue=round(result.queue_ms, 2),
            inference=round(result.inference_ms, 2),
            total=round(1000.0 * (time.perf_counter() - start), 2),
        ),
    )


# -- the other routes ----------------------------------------------------------------------------


async def healthz() -> Health:
    """The process is alive (says nothing about the model; see /readyz)."""
    return Health()


async def readyz(request: Request) -> Readiness:
    """200 once the model is loaded and warmed up and requests are accepted; else 503."""
    if request.app.state.drain.draining:
        raise ShuttingDown()
    runtime, _, _ = _ready_parts(request)
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
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue_size=settings.max_queue_size,
        heatmap_grid=runtime.heatmap_grid,
        warmed_up=runtime.warmed_up,
        load_seconds=round(runtime.load_seconds, 3),
    )
    return ModelInfo(**runtime.card.model_dump(), runtime=info)


# -- the app -------------------------------------------------------------------------------------


def settings_of(app: FastAPI) -> Settings:
    """The settings the routes see: ``dependency_overrides[get_settings]`` wins, as in routes."""
    provider: Callable[[], Settings] = app.dependency_overrides.get(get_settings, get_settings)
    return provider()


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
    )
    await asyncio.to_thread(runtime.warm_up, (1, settings.max_batch_size))
    app.state.metrics.set_model(runtime.card.name, runtime.card.version)
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="cxr-decode")
    batcher = MicroBatcher(
        runtime.run,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue_size=settings.max_queue_size,
        metrics=app.state.metrics,
    )
    await batcher.start()
    app.state.runtime, app.state.batcher, app.state.decode_pool = runtime, batcher, pool
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
        await batcher.stop(timeout_s=settings.request_timeout_s)
        pool.shutdown(wait=True, cancel_futures=True)
        app.state.batcher = app.state.decode_pool = None
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
    app.state.audit = AuditLog(effective.audit_db)
    app.state.drain = Drain()

    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)

    model_routes = APIRouter(dependencies=list(protected_dependencies(effective)))
    model_routes.add_api_route(
        PREDICT_PATH,
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=problem_responses(400, 401, 413, 415, 422, 500, 503, 504),
        openapi_extra=_PREDICT_OPENAPI,
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
