"""Structured JSON logs with request ids, and never a patient field.

Every line is one JSON object: ``time``, ``level``, ``logger``, ``message``, ``request_id`` and
whatever a caller passed as ``extra=``. Log shippers (Loki, Elastic, CloudWatch) parse it without
a grok pattern, and one request's lines are found by its id, which the client also gets back in
the ``X-Request-ID`` header and the response body.

DICOM headers carry the patient's name, id and birth date. The service never reads them into a
log call, and :class:`PatientFieldFilter` drops any such field that a future ``extra=`` passes by
mistake, before a handler formats the record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Inbound ids are echoed into logs and headers: accept only short, plain tokens.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# DICOM keywords (and their snake_case spellings) that identify a patient or could help to.
_PATIENT_KEYWORDS = frozenset(
    keyword.lower()
    for keyword in (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientMotherBirthName",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientComments",
        "EthnicGroup",
        "MilitaryRank",
        "MedicalRecordLocator",
        "ResponsiblePerson",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "InstitutionName",
        "InstitutionAddress",
        "StudyID",
        "AdmissionID",
        "PatientInsurancePlanCodeSequence",
    )
)

# Attributes every LogRecord has; anything else on a record came in through ``extra=``
# (except uvicorn's ``color_message``, the same text with terminal colour codes).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def is_patient_field(name: str) -> bool:
    """Whether a field name is a DICOM patient keyword, in any case, with or without ``_``."""
    key = name.replace("_", "").replace("-", "").lower()
    return key in _PATIENT_KEYWORDS or key.startswith("patient")


class PatientFieldFilter(logging.Filter):
    """Drop patient-identifying ``extra=`` fields from every record (defence in depth)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in [name for name in record.__dict__ if name not in _RECORD_ATTRS]:
            if is_patient_field(name):
                delattr(record, name)
        return True


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request it was logged in, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not is_patient_field(str(k))}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; uvicorn's access records become method/path/status fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            client, method, path, http_version, status = record.args
            entry["message"] = f"{method} {path} {status}"
            entry.update(
                client=client, method=method, path=path, http_version=http_version, status=status
            )
        else:
            entry["message"] = record.getMessage()
        entry["request_id"] = getattr(record, "request_id", None)
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRS and name not in entry and not is_patient_field(name):
                entry[name] = _jsonable(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal (``CXR_LOG_JSON=false``), still with the request id."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


_SERVICE_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "app", "fastapi")


def configure_logging(settings: Settings, *, stream: Any = None) -> logging.Handler:
    """Send every log line (the app's and uvicorn's, access log included) through one handler.

    Replaces handlers uvicorn installed from its own ``log_config`` so its lines come out in the
    same format. Idempotent: calling it again replaces the handler it installed before.
    """
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name("cxr-triage")
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(PatientFieldFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "cxr-triage"]:
        root.removeHandler(old)
    root.addHandler(handler)
    level = logging.getLevelName(settings.log_level.upper())
    root.setLevel(level if isinstance(level, int) else logging.INFO)
    for name in _SERVICE_LOGGERS:
        service_logger = logging.getLogger(name)
        service_logger.handlers.clear()
        service_logger.propagate = True
        service_logger.setLevel(logging.NOTSET)
    # pydicom's debug output can print element values; keep it to real problems.
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    return handler


def new_request_id(inbound: str | None = None) -> str:
    """The caller's ``X-Request-ID`` when it is a plain token, else a fresh random id."""
    if inbound and _REQUEST_ID_RE.fullmatch(inbound):
        return inbound
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Give every HTTP request an id: in the log context, ``scope['state']`` and the response.

    Pure ASGI, so the context variable is set in the task that runs the route and uvicorn's
    access log line, and streaming bodies pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbound = _header(scope, b"x-request-id")
        request_id = new_request_id(inbound)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def current_request_id() -> str | None:
    """The id of the request being served in this task, if any."""
    return request_id_var.get()


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
