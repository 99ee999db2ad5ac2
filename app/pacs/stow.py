"""STOW-RS: ``POST /dicomweb/studies[/{study}]`` (PS3.18 10.5), the HTTP way into the assembler.

The body is ``multipart/related; type="application/dicom"``, one DICOM Part 10 instance per
part. Each part goes through the same receive path as a C-STORE (durable write before it is
acknowledged); the answer is a PS3.18 Store Instances Response in ``application/dicom+json``:
``00081199`` ReferencedSOPSequence for what was stored, ``00081198`` FailedSOPSequence with
``00081197`` FailureReason for what was not, and the status 200 (all stored), 202 (some
failed) or 409 (none stored). A resend of an instance already triaged counts as stored (the
service has it), exactly as C-STORE answers 0x0000 for it.

Only binary instances are taken: the metadata + bulk data form (``type=application/dicom+json``
or XML) answers 415. The whole request is bounded by ``CXR_MAX_UPLOAD_MB``; for large studies,
post instances in several requests (routers do so by default).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.errors import request_id_of
from app.api.problems import Problem
from app.pacs.store import CANNOT_UNDERSTAND, is_uid
from app.pacs.studies import Receipt

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
MAX_PARTS = 1000
# RFC 2046 5.1.1 says 70, but Orthanc's STOW-RS client sends longer ones: take what the
# multipart parser can (256) and refuse the rest with a 400 rather than its exception.
MAX_BOUNDARY = 256

STOW_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "DICOM Part 10 instances, one per part of a multipart/related body "
        '(Content-Type: multipart/related; type="application/dicom"; boundary=...).',
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    },
    "responses": {
        "200": {
            "description": "Every instance was stored (PS3.18 Store Instances Response)",
            "content": {
                DICOM_JSON: {
                    "example": {
                        "00081199": {
                            "vr": "SQ",
                            "Value": [
                                {
                                    "00081150": {
                                        "vr": "UI",
                                        "Value": ["1.2.840.10008.5.1.4.1.1.1"],
                                    },
                                    "00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                                }
                            ],
                        }
                    }
                }
            },
        },
        "202": {
            "description": "Some instances were stored, others are in FailedSOPSequence",
            "content": {DICOM_JSON: {}},
        },
        "409": {
            "description": "No instance was stored; FailedSOPSequence says why",
            "content": {DICOM_JSON: {}},
        },
    },
}


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def related_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body, else a 4xx."""
    media, params = parse_options_header(content_type)
    media_type = media.decode("latin-1").strip().lower()
    if media_type != "multipart/related":
        raise Problem(
            415,
            'STOW-RS takes multipart/related; type="application/dicom" '
            f"(got {media_type or 'no Content-Type'}).",
            slug="unsupported-media-type",
        )
    part_type = params.get(b"type", b"application/dicom").decode("latin-1").strip().lower()
    if part_type != "application/dicom":
        raise Problem(
            415,
            f"Only DICOM Part 10 instances are accepted (type={part_type}); the metadata and "
            "bulk data form is not supported.",
            slug="unsupported-media-type",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(
            400, "The multipart/related Content-Type has no boundary.", slug="bad-request"
        )
    if len(boundary) > MAX_BOUNDARY:
        raise Problem(
            400,
            f"The multipart boundary is longer than {MAX_BOUNDARY} characters.",
            slug="bad-request",
        )
    return boundary


async def read_parts(request: Request, boundary: bytes) -> list[_Part]:
    """Every part of the body (headers lower-cased); a malformed body is a 400."""
    parts: list[_Part] = []
    field_name = bytearray()
    value = bytearray()
    finished = False

    def begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise Problem(413, f"At most {MAX_PARTS} instances per request.", slug="too-many-parts")
        parts.append(_Part())

    def header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def header_end() -> None:
        parts[-1].headers[field_name.decode("latin-1").strip().lower()] = value.decode(
            "latin-1"
        ).strip()
        field_name.clear()
        value.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.extend(data[start:end])

    def end() -> None:
        nonlocal finished
        finished = True

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": begin,
                "on_header_field": header_field,
                "on_header_value": header_value,
                "on_header_end": header_end,
                "on_part_data": part_data,
                "on_end": end,
            },
            max_header_count=32,
        )
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise Problem(
            400, f"The multipart/related body is malformed: {exc}", slug="bad-multipart"
        ) from None
    if not finished:
        raise Problem(
            400,
            "The multipart/related body ends before its closing boundary.",
            slug="bad-multipart",
        )
    if not parts:
        raise Problem(400, "The multipart/related body holds no instance.", slug="empty-upload")
    return parts


def store_response(receipts: list[Receipt]) -> tuple[int, dict[str, Any]]:
    """PS3.18 Store Instances Response: (HTTP status, DICOM JSON)."""
    response = Dataset()
    stored, failed = [], []
    for receipt in receipts:
        item = Dataset()
        if receipt.sop_class_uid and is_uid(receipt.sop_class_uid):
            item.ReferencedSOPClassUID = receipt.sop_class_uid
        if receipt.sop_instance_uid and is_uid(receipt.sop_instance_uid):
            item.ReferencedSOPInstanceUID = receipt.sop_instance_uid
        if receipt.ok:
            stored.append(item)
        else:
            item.FailureReason = receipt.status
            failed.append(item)
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    status = 200 if not failed else (202 if stored else 409)
    return status, response.to_json_dict()


async def stow(request: Request, study: str | None = None) -> JSONResponse:
    """Store DICOM instances (STOW-RS); they are triaged once their study is stable."""
    service = getattr(request.app.state, "pacs", None)
    if service is None:
        raise Problem(
            503,
            "The PACS side is not running (CXR_PACS_ENABLED=false, or starting up).",
            slug="not-ready",
            headers={"Retry-After": "5"},
        )
    if study is not None and not is_uid(study):
        raise Problem(404, "The study in the URL is not a DICOM UID.", slug="not-found")
    boundary = related_boundary(request.headers.get("content-type", ""))
    parts = await read_parts(request, boundary)
    request_id = request_id_of(request)
    receipts: list[Receipt] = []
    for part in parts:
        declared = part.headers.get("content-type", "application/dicom").split(";")[0]
        if declared.strip().lower() != "application/dicom":
            receipts.append(
                Receipt("refused", CANNOT_UNDERSTAND, f"part Content-Type {declared[:64]}")
            )
            continue
        data = bytes(part.data)
        part.data.clear()
        receipts.append(
            await asyncio.to_thread(
                service.receive,
                data,
                source="stow-rs",
                request_id=request_id,
                expected_study=study,
            )
        )
    status, body = store_response(receipts)
    logger.info(
        "STOW-RS",
        extra={
            "stored": sum(r.ok for r in receipts),
            "failed": len(receipts) - sum(r.ok for r in receipts),
        },
    )
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)
