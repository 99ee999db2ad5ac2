"""``POST /predict``: one image in, findings (and optionally a heatmap) out."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from fastapi import Depends, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from app.api.errors import request_id_of
from app.api.problems import Problem
from app.api.schemas import (
    DicomUIDs,
    Finding,
    Heatmap,
    ImageInfo,
    ModelRef,
    PredictResponse,
    TimingMs,
)
from app.card import ModelCard
from app.imaging.decode import DecodedImage, NotEligible
from app.imaging.heatmap import explained_label, overlay_png_base64, select_map
from app.imaging.prepare import DecodeProcesses, prepare
from app.inference.batcher import MicroBatcher, NotAccepting
from app.inference.runtime import ModelRuntime
from app.inference.scoring import score
from app.ops.audit import entry_for
from app.ops.metrics import Metrics
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)

RAW_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "application/dicom"})
# Generic types say nothing about the format: let the decoder sniff the bytes.
_SNIFF_MEDIA_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
PREDICT_PATH = "/predict"
# Starlette spools a multipart file part to a temporary file on disk past 1 MB, so every
# uncompressed DICOM (8 MB at 2k x 2k, 16 bit) was written out and read back before decoding.
# The upload limit (CXR_MAX_UPLOAD_MB, enforced before the form is parsed) already bounds what a
# part can hold, as it does for raw bodies, which are read into memory anyway.
MultiPartParser.spool_max_size = 1 << 30

_BINARY = {"type": "string", "format": "binary"}
PREDICT_OPENAPI: dict[str, Any] = {
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


def eligibility_gate(decoded: DecodedImage, policy: str) -> list[str]:
    """The response's warnings after DESIGN.md's eligibility policy (enforce: raise
    :class:`NotEligible`; warn: say what would have been refused). PNG/JPEG carry no verdict."""
    warnings = list(decoded.warnings)
    verdict = decoded.eligibility
    if verdict is None:
        return warnings
    if verdict.refusals:
        if policy == "enforce":
            raise NotEligible(verdict.refusals)
        warnings.extend(
            f"not eligible, scored anyway (CXR_ELIGIBILITY=warn): {r.reason}"
            for r in verdict.refusals
        )
    warnings.extend(verdict.warnings)
    return warnings


def image_info(decoded: DecodedImage) -> ImageInfo | None:
    meta = decoded.image
    if meta is None:
        return None
    return ImageInfo(
        modality=meta.modality,
        view_position=meta.view_position,
        body_part=meta.body_part,
        photometric_interpretation=meta.photometric_interpretation,
        rows=meta.rows,
        columns=meta.columns,
        bits_stored=meta.bits_stored,
        window_source=meta.window_source,
    )


def ready_parts(request: Request) -> tuple[ModelRuntime, MicroBatcher, ThreadPoolExecutor]:
    state = request.app.state
    runtime, batcher, pool = state.runtime, state.batcher, state.decode_pool
    if runtime is None or batcher is None or pool is None or not batcher.accepting:
        raise NotAccepting("The model is not loaded yet, or the service is shutting down.")
    return runtime, batcher, pool


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def heatmap_request(value: str, labels: list[str]) -> tuple[bool, str | None]:
    """``heatmap=true|false|<label>`` -> (wanted, the label asked for or None for the default).

    A label matches case-insensitively, with spaces for underscores (``Pleural Thickening``).
    """
    key = value.strip().lower()
    if key in _TRUE:
        return True, None
    if key in _FALSE:
        return False, None
    by_key = {lbl.lower().replace("_", " "): lbl for lbl in labels}
    label = by_key.get(key.replace("_", " "))
    if label is None:
        raise Problem(
            422,
            f"heatmap must be true, false or one of the model's labels ({', '.join(labels)}).",
            slug="invalid-heatmap",
        )
    return True, label


def render_heatmap(
    card: ModelCard,
    pixels: np.ndarray,
    raw: np.ndarray,
    findings: list[Finding],
    flagged: list[str],
    requested: str | None,
) -> Heatmap:
    """The response's heatmap block for one image (runs in the decode pool: PNG encoding)."""
    probs = [f.probability for f in findings]
    label = explained_label(card.labels, probs, flagged, requested)
    index = card.labels.index(label)
    grid = select_map(raw, index)
    png = overlay_png_base64(
        pixels,
        grid,
        finding=label,
        probability=probs[index],
        resize=card.input.resize,
        input_size=(card.input.height, card.input.width),
    )
    return Heatmap(
        method=card.heatmap_method,
        label=label,
        per_label=card.heatmap_shape == "per_label",
        grid=np.round(grid.astype(np.float64), 4).tolist(),
        png_base64=png,
    )


async def predict(
    request: Request,
    heatmap: str = Query(
        "false",
        description="true: also return the heatmap of the most probable flagged finding and its "
        "PNG overlay; a label (e.g. Cardiomegaly): the map of that finding; false: none",
        examples=["true", "Cardiomegaly"],
    ),
    settings: Settings = Depends(get_settings),
) -> PredictResponse:
    """Score one chest radiograph (PNG, JPEG or DICOM)."""
    start = time.perf_counter()
    runtime, batcher, pool = ready_parts(request)
    want_heatmap, heatmap_label = heatmap_request(heatmap, runtime.card.labels)
    metrics: Metrics = request.app.state.metrics
    data, hint = await read_upload(request)
    loop = asyncio.get_running_loop()
    card = runtime.card
    audit = entry_for(request)
    if audit is not None:
        audit.note_model(card.name, card.version)
    with batcher.admit() as slot:
        processes: DecodeProcesses | None = request.app.state.decode_processes
        reduce = settings.reduced_decode
        if processes is not None and not want_heatmap:
            prepared = await processes.prepare(
                data, hint, card.input, settings.max_pixels, reduce=reduce
            )
        else:
            # Full-size pixels only for the overlay; without it the codec may decode reduced.
            decode = partial(prepare, keep_pixels=want_heatmap, reduce=reduce)
            prepared = await loop.run_in_executor(
                pool, decode, data, hint, card, settings.max_pixels
            )
        del data
        if audit is not None:
            audit.note_image(prepared.decoded.source, prepared.decoded.dicom)
        metrics.decode_duration.observe(prepared.seconds)
        warnings = eligibility_gate(prepared.decoded, settings.eligibility)
        result = await slot.submit(prepared.model_input)
    findings, triage = score(card, result.logits)
    if audit is not None:
        audit.note_findings(triage.screening_positive, triage.diagnosis_positive, triage.abnormal)
    heatmap_out = None
    if want_heatmap:
        heatmap_out = await loop.run_in_executor(
            pool,
            render_heatmap,
            card,
            prepared.decoded.pixels,
            result.heatmap,
            findings,
            triage.screening_positive,
            heatmap_label,
        )
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
        image=image_info(prepared.decoded),
        findings=findings,
        triage=triage,
        heatmap=heatmap_out,
        warnings=warnings,
        timing_ms=TimingMs(
            decode=round(1000.0 * prepared.seconds, 2),
            queue=round(result.queue_ms, 2),
            inference=round(result.inference_ms, 2),
            total=round(1000.0 * (time.perf_counter() - start), 2),
        ),
    )
