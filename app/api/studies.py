"""``GET /v1/studies/{StudyInstanceUID}``: a study's triage result and delivery state.

The JSON is DESIGN.md's ("PACS integration"). It survives restarts (it is read from the study
database and the outbox) and holds no patient field: UIDs, statuses, model output only.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Path, Request
from pydantic import BaseModel, Field

from app.api.problems import Problem
from app.api.schemas import ModelRef, Triage

_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"

StudyState = Literal["receiving", "scored", "delivered", "failed"]


class StudyFinding(BaseModel):
    label: str = Field(examples=["Pneumothorax"])
    probability: float = Field(ge=0.0, le=1.0, examples=[0.91])
    screening_positive: bool = Field(examples=[True])
    diagnosis_positive: bool = Field(examples=[True])


class StudyInstance(BaseModel):
    sop_instance_uid: str = Field(examples=[_UID + ".3"])
    status: Literal["received", "scored", "ineligible", "duplicate", "undecodable"] = Field(
        examples=["ineligible"]
    )
    reason: str | None = Field(examples=["ViewPosition LL is not frontal"])


class StudyResultObject(BaseModel):
    sop_instance_uid: str = Field(examples=[_UID + ".9"])
    kind: Literal["sr", "sc"] = Field(examples=["sr"])
    destination: str = Field(examples=["dimse://PACS@10.0.0.5:104"])
    delivery: Literal["pending", "delivered", "failed"] = Field(examples=["delivered"])
    attempts: int = Field(ge=0, examples=[1])


class StudyResponse(BaseModel):
    """A study as the service sees it; ``priority``, ``model`` and ``triage`` are null until
    its first result."""

    study_instance_uid: str = Field(examples=[_UID + ".1"])
    state: StudyState = Field(
        description="receiving: instances arriving or waiting to be scored; scored: result "
        "written (no destination, or delivery pending); delivered: every destination has the "
        "latest result objects; failed: a destination refused them, or scoring gave up",
        examples=["delivered"],
    )
    priority: Literal["ROUTINE", "HIGH", "STAT"] | None = Field(examples=["STAT"])
    model: ModelRef | None
    findings: list[StudyFinding] = Field(
        description="Per finding, the maximum over the study's scored images, model order"
    )
    triage: Triage | None
    instances: list[StudyInstance]
    results: list[StudyResultObject] = Field(
        description="Every result object of the study (all revisions) per destination"
    )


def study_state(row: dict[str, Any], latest: list[str], deliveries: list[dict[str, Any]]) -> str:
    """The one-word state of DESIGN.md from the study row and its latest objects' deliveries."""
    if row["state"] in ("receiving", "failed"):
        return row["state"]
    current = [d for d in deliveries if d["sop_instance_uid"] in set(latest)]
    if not current:
        return "scored"
    if any(d["delivery"] == "failed" for d in current):
        return "failed"
    if all(d["delivery"] == "delivered" for d in current):
        return "delivered"
    return "scored"


def study_response(found: dict[str, Any]) -> StudyResponse:
    row = found["study"]
    instances: list[StudyInstance] = []
    for inst in found["instances"]:
        instances.append(
            StudyInstance(
                sop_instance_uid=inst["sop_instance_uid"],
                status=inst["status"],
                reason=inst["reason"],
            )
        )
        if inst["duplicates"]:
            times = "once" if inst["duplicates"] == 1 else f"{inst['duplicates']} times"
            instances.append(
                StudyInstance(
                    sop_instance_uid=inst["sop_instance_uid"],
                    status="duplicate",
                    reason=f"received again {times} with the same pixels; "
                    f"already triaged by model {inst['model_version']}",
                )
            )
    findings = [
        StudyFinding(
            label=f["label"],
            probability=f["probability"],
            screening_positive=f["screening_positive"],
            diagnosis_positive=f["diagnosis_positive"],
        )
        for f in json.loads(row["findings"] or "[]")
    ]
    return StudyResponse(
        study_instance_uid=row["study_instance_uid"],
        state=study_state(row, found["latest_results"], found["deliveries"]),  # type: ignore[arg-type]
        priority=row["priority"],
        model=ModelRef(name=row["model_name"], version=row["model_version"])
        if row["model_name"]
        else None,
        findings=findings,
        triage=Triage.model_validate_json(row["triage"]) if row["triage"] else None,
        instances=instances,
        results=[StudyResultObject(**d) for d in found["deliveries"]],
    )


async def get_study(
    request: Request,
    study_instance_uid: str = Path(
        description="The StudyInstanceUID", examples=[_UID + ".1"], max_length=64
    ),
) -> StudyResponse:
    """A study received over C-STORE or STOW-RS: result, priority, instances, deliveries."""
    service = getattr(request.app.state, "pacs", None)
    if service is None:
        raise Problem(
            503,
            "The PACS side is not running (CXR_PACS_ENABLED=false, or starting up).",
            slug="not-ready",
            headers={"Retry-After": "5"},
        )
    found = await service.study(study_instance_uid)
    if found is None:
        raise Problem(
            404,
            "No instance of this study has been received.",
            slug="study-not-found",
            title="Not Found",
        )
    return study_response(found)
