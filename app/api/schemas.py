"""Response models: the JSON of DESIGN.md's HTTP API, with examples for ``/docs``.

These models are the contract PACS integrations code against; field names and nesting follow
DESIGN.md exactly. There is deliberately no field that could carry a patient identifier: DICOM
results carry the three instance UIDs only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.problems import PROBLEM_MEDIA_TYPE
from app.card import HeatmapMethod, ModelCard

_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


class ModelRef(BaseModel):
    name: str = Field(examples=["default"])
    version: str = Field(examples=["0.1.0"])


class DicomUIDs(BaseModel):
    """The DICOM instance UIDs of the uploaded object, so results can be filed back in PACS."""

    study_instance_uid: str | None = Field(examples=[_UID + ".1"])
    series_instance_uid: str | None = Field(examples=[_UID + ".2"])
    sop_instance_uid: str | None = Field(examples=[_UID + ".3"])


class ImageInfo(BaseModel):
    """What was scored: coded DICOM values only (no patient field), null where absent.

    For PNG/JPEG only ``rows``, ``columns`` and ``bits_stored`` (the file's bit depth) are set.
    ``window_source`` says which VOI stage made the displayed image: the VOI LUT Sequence, the
    Window Center/Width, or a min-max window over the image's own values (padding excluded).
    """

    modality: str | None = Field(examples=["DX"])
    view_position: str | None = Field(examples=["PA"])
    body_part: str | None = Field(description="BodyPartExamined", examples=["CHEST"])
    photometric_interpretation: str | None = Field(examples=["MONOCHROME2"])
    rows: int = Field(examples=[2500])
    columns: int = Field(examples=[2048])
    bits_stored: int | None = Field(examples=[12])
    window_source: Literal["voi_lut", "window", "min_max"] | None = Field(examples=["window"])


class Finding(BaseModel):
    """One model label: probability, the card's two thresholds, and the two flags.

    A flag is true when ``probability >= threshold``.
    """

    label: str = Field(examples=["Atelectasis"])
    probability: float = Field(ge=0.0, le=1.0, examples=[0.07])
    screening_threshold: float = Field(examples=[0.03])
    diagnosis_threshold: float = Field(examples=[0.21])
    screening_positive: bool = Field(examples=[True])
    diagnosis_positive: bool = Field(examples=[False])


class Triage(BaseModel):
    """Summary for worklist triage; see docs/serving.md, "What abnormal means"."""

    screening_positive: list[str] = Field(
        description="Pathologies (not 'No Finding') over their screening threshold, model order",
        examples=[["Atelectasis"]],
    )
    diagnosis_positive: list[str] = Field(
        description="Pathologies (not 'No Finding') over their diagnosis threshold, model order",
        examples=[[]],
    )
    abnormal: bool = Field(
        description="True when at least one pathology is diagnosis-positive",
        examples=[False],
    )


class Heatmap(BaseModel):
    method: HeatmapMethod = Field(examples=["cam"])
    label: str = Field(
        description="The finding the map explains: the one asked for (heatmap=<label>), else "
        "the most probable screening-positive finding, else the most probable pathology",
        examples=["Cardiomegaly"],
    )
    per_label: bool = Field(
        description="True when the model has one map per label; false when one map per image "
        "explains every label (attention rollout)",
        examples=[True],
    )
    grid: list[list[float]] = Field(
        description="The model's [h, w] map for `label`, values in [0, 1], row-major from the "
        "image's top, covering the whole image",
        examples=[[[0.1, 0.3], [0.2, 0.9]]],
    )
    png_base64: str = Field(
        description="PNG of the map over the uploaded image (its aspect, long side <= 1024 px), "
        "with a 0..1 colour legend, the finding and 'not for diagnostic use' burned in",
        examples=["iVBORw0KGgo..."],
    )


class TimingMs(BaseModel):
    decode: float = Field(description="Decode and preprocessing", examples=[12.1])
    queue: float = Field(description="Waiting for a batch to start", examples=[3.0])
    inference: float = Field(description="The session run of this request's batch", examples=[95.2])
    total: float = Field(description="Upload received to response ready", examples=[111.0])


class PredictResponse(BaseModel):
    """``POST /predict`` answer."""

    request_id: str = Field(examples=["6f1c2b0e9d4a4c8f9a51a3e2d7b4c010"])
    model: ModelRef
    dicom: DicomUIDs | None = Field(description="Null for PNG and JPEG uploads")
    image: ImageInfo | None = Field(
        default=None, description="What was scored (DICOM attributes null for PNG/JPEG)"
    )
    findings: list[Finding] = Field(description="One per model label, in model order")
    triage: Triage
    heatmap: Heatmap | None = Field(description="Null unless heatmap=true")
    warnings: list[str] = Field(examples=[["DICOM has 3 frames; the first was used"]])
    timing_ms: TimingMs

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "request_id": "6f1c2b0e9d4a4c8f9a51a3e2d7b4c010",
                    "model": {"name": "default", "version": "0.1.0"},
                    "dicom": {
                        "study_instance_uid": _UID + ".1",
                        "series_instance_uid": _UID + ".2",
                        "sop_instance_uid": _UID + ".3",
                    },
                    "image": {
                        "modality": "DX",
                        "view_position": "PA",
                        "body_part": "CHEST",
                        "photometric_interpretation": "MONOCHROME2",
                        "rows": 2500,
                        "columns": 2048,
                        "bits_stored": 12,
                        "window_source": "window",
                    },
                    "findings": [
                        {
                            "label": "Atelectasis",
                            "probability": 0.07,
                            "screening_threshold": 0.03,
                            "diagnosis_threshold": 0.21,
                            "screening_positive": True,
                            "diagnosis_positive": False,
                        }
                    ],
                    "triage": {
                        "screening_positive": ["Atelectasis"],
                        "diagnosis_positive": [],
                        "abnormal": False,
                    },
                    "heatmap": None,
                    "warnings": [],
                    "timing_ms": {"decode": 12.1, "queue": 3.0, "inference": 95.2, "total": 111.0},
                }
            ]
        },
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelRef
    provider: str = Field(examples=["CPUExecutionProvider"])


class RuntimeInfo(BaseModel):
    """How the model runs in this process."""

    providers: list[str] = Field(
        description="Execution providers ONNX Runtime actually uses, in priority order",
        examples=[["CPUExecutionProvider"]],
    )
    requested_providers: list[str] = Field(examples=[["CPUExecutionProvider"]])
    available_providers: list[str] = Field(
        examples=[["CUDAExecutionProvider", "CPUExecutionProvider"]]
    )
    device: Literal["cpu", "cuda"] = Field(examples=["cpu"])
    intra_op_threads: int = Field(examples=[2])
    max_batch_size: int = Field(
        description="Largest batch the batcher forms: CXR_MAX_BATCH_SIZE, or less where the "
        "start-up probe (CXR_BATCH_PROBE) found smaller batches faster per image",
        examples=[8],
    )
    batch_probe_ms_per_image: dict[int, float] | None = Field(
        None,
        description="What the start-up probe measured: ms per image by batch size",
        examples=[{1: 2.1, 2: 1.4, 4: 1.0, 8: 0.8}],
    )
    inference_streams: int = Field(
        1, description="Session runs at once under load (CXR_INFERENCE_STREAMS)", examples=[2]
    )
    max_batch_delay_ms: float = Field(examples=[2.0])
    max_queue_size: int = Field(examples=[64])
    heatmap_grid: tuple[int, int] | None = Field(examples=[(14, 14)])
    warmed_up: bool
    load_seconds: float


class ModelInfo(ModelCard):
    """``GET /v1/model``: the model card as shipped, plus how it runs here."""

    runtime: RuntimeInfo


class RefusalDetail(BaseModel):
    """One attribute that makes a DICOM ineligible (``not-eligible`` problems only)."""

    attribute: str = Field(examples=["ViewPosition"])
    value: str = Field(examples=["LL"])
    reason: str = Field(examples=["ViewPosition LL is not frontal"])


class ProblemDetails(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(examples=["https://cxr-triage.dev/problems/unsupported-media-type"])
    title: str = Field(examples=["Unsupported Media Type"])
    status: int = Field(examples=[415])
    detail: str = Field(examples=["Send PNG, JPEG or DICOM (got text/plain)."])
    request_id: str | None = Field(default=None, examples=["6f1c2b0e9d4a4c8f9a51a3e2d7b4c010"])
    refusals: list[RefusalDetail] | None = Field(
        default=None,
        description="Only in a not-eligible problem: each attribute that says the DICOM is not "
        "a frontal chest radiograph",
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting problem+json bodies for the given statuses."""
    reasons = {
        400: "The upload cannot be decoded (the detail says why)",
        401: "A valid API key is required",
        413: "The upload or its decoded image is too large",
        415: "Not PNG, JPEG or DICOM",
        422: "The request or the image cannot be used (the detail says why; not-eligible: a "
        "DICOM that is not a frontal chest radiograph, with its refusals)",
        500: "Internal error (no internals are disclosed)",
        503: "Queue full, model not loaded, or shutting down; see Retry-After",
        504: "The request's deadline passed",
    }
    schema = _inline_defs(ProblemDetails.model_json_schema())
    return {
        status: {
            "description": reasons.get(status, "Problem"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
        }
        for status in statuses
    }


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place: a ``#/$defs/...`` reference means nothing
    inside an OpenAPI document (ReDoc refuses to render the page, Swagger UI shows resolver
    errors). Pydantic's nested models here are not recursive, so inlining terminates."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]
