"""The PACS half's shared vocabulary: what the receiving side hands to the result writer.

``pacs-in`` (receive, assemble, triage) produces a :class:`StudyResult`; ``pacs-out`` (SR/SC,
outbox, senders) turns it into :class:`ResultObject` files and delivers them to each
:class:`Destination`. Nothing here carries a patient field: the result writer reads those from the
stored source files (``InstanceOutcome.path``) and writes them only into the DICOM objects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from app.api.schemas import Finding, Triage


class InstanceStatus(str, Enum):
    """Where one received instance stands (values as in DESIGN.md's ``GET /v1/studies``)."""

    RECEIVED = "received"  # on disk, its study not yet scored
    SCORED = "scored"  # eligible, decoded and part of the study result
    INELIGIBLE = "ineligible"  # refused by the eligibility gate (``reason`` says why)
    DUPLICATE = "duplicate"  # same SOP Instance UID + pixels + model version already scored
    UNDECODABLE = "undecodable"  # eligible header, pixels that cannot be decoded

    def __str__(self) -> str:
        return self.value


class Priority(str, Enum):
    """Worklist priority of a study; rules can only raise it (ROUTINE < HIGH < STAT)."""

    ROUTINE = "ROUTINE"
    HIGH = "HIGH"
    STAT = "STAT"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return _PRIORITY_ORDER.index(self)


_PRIORITY_ORDER = (Priority.ROUTINE, Priority.HIGH, Priority.STAT)

ANY_FINDING = "*"


@dataclass(frozen=True)
class PriorityRule:
    """``Label:flag=PRIORITY``: a study whose ``label`` is ``flag``-positive gets ``priority``.

    ``label`` is a model label or ``*`` (any pathology, not "No Finding"); ``flag`` is
    ``screening`` or ``diagnosis``; ``priority`` is HIGH or STAT (a rule only ever raises).
    """

    label: str
    flag: Literal["screening", "diagnosis"]
    priority: Priority

    def __str__(self) -> str:
        return f"{self.label}:{self.flag}={self.priority}"


def parse_priority_rules(text: str | None, labels: Sequence[str] | None) -> list[PriorityRule]:
    """``CXR_PRIORITY_RULES``, e.g. ``Pneumothorax:diagnosis=STAT,*:diagnosis=HIGH``.

    Label names match case-insensitively with spaces for underscores (``pleural thickening``);
    an unknown label, flag or priority is an error, so a typo never silently disables a rule.
    ``labels`` None checks the syntax only.
    """
    if text is None or not text.strip():
        return []
    canonical = {_fold(label): label for label in labels or ()}
    rules: list[PriorityRule] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        head, eq, priority = part.rpartition("=")
        label, colon, flag = head.rpartition(":")
        if not eq or not colon or not label.strip():
            raise ValueError(f"priority rule {part!r}: write Label:screening|diagnosis=HIGH|STAT")
        label, flag, priority = label.strip(), flag.strip().lower(), priority.strip().upper()
        if label != ANY_FINDING and labels is not None:
            if _fold(label) not in canonical:
                raise ValueError(f"priority rule {part!r}: {label!r} is not a model label")
            label = canonical[_fold(label)]
        if flag not in ("screening", "diagnosis"):
            raise ValueError(f"priority rule {part!r}: the flag is screening or diagnosis")
        if priority not in (Priority.HIGH.value, Priority.STAT.value):
            raise ValueError(f"priority rule {part!r}: a rule raises to HIGH or STAT")
        rules.append(PriorityRule(label, flag, Priority(priority)))  # type: ignore[arg-type]
    return rules


def _fold(label: str) -> str:
    return " ".join(label.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class InstanceOutcome:
    """One received SOP instance of a study and what triage made of it."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path  # the stored Part 10 file (source of the Patient/Study modules and pixels)
    status: InstanceStatus
    reason: str | None  # why it was not scored (ineligible / undecodable / duplicate)
    pixel_hash: str  # SHA-256 hex of the PixelData element's bytes ("" when there is none)


@dataclass(frozen=True)
class Explained:
    """The heatmap to burn into the Secondary Capture.

    ``grid`` is the model's ``[h, w]`` map (values in [0, 1]) for the image that drove the top
    flagged finding of the study (or the top finding when none is flagged).
    """

    sop_instance_uid: str
    label: str
    probability: float
    grid: np.ndarray


@dataclass(frozen=True)
class StudyResult:
    """A scored study: what the SR states and the SC shows.

    ``findings`` are per-finding maxima over the eligible frontal images (flags from the card's
    thresholds); ``supersedes`` lists the SOP Instance UIDs of this study's earlier result
    objects (a late instance re-triaged it); ``revision`` counts from 1.
    """

    study_instance_uid: str
    model_name: str
    model_version: str
    findings: list[Finding]
    triage: Triage
    priority: str  # a Priority value: "ROUTINE" | "HIGH" | "STAT"
    instances: list[InstanceOutcome]
    explained: Explained | None
    supersedes: list[str] = field(default_factory=list)
    revision: int = 1

    @property
    def scored(self) -> list[InstanceOutcome]:
        return [i for i in self.instances if i.status is InstanceStatus.SCORED]


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object written for a study result, ready for the outbox."""

    kind: Literal["sr", "sc"]
    sop_instance_uid: str
    path: Path


# AE titles: 1-16 characters of the default repertoire, no backslash or control characters.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str) -> str:
    """``value`` if it is a usable AE title (PS3.5 AE: 1-16 chars, not all spaces), else raise."""
    if not _AE_RE.match(value) or value != value.strip() or not value.strip():
        raise ValueError(f"{value!r} is not an AE title (1-16 characters, no backslash)")
    return value


@dataclass(frozen=True)
class Destination:
    """Where results go: a DIMSE C-STORE SCP or a STOW-RS root.

    ``url`` is the configured text (it may hold ``user:password@`` for STOW); ``label`` is the
    same without credentials, the form for logs, metrics and ``GET /v1/studies``.
    """

    kind: Literal["dimse", "stow"]
    url: str
    host: str
    port: int
    ae_title: str | None = None  # called AE title (dimse only)

    @property
    def label(self) -> str:
        if self.kind == "dimse":
            return self.url
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:  # never the credentials of a STOW URL
        return f"Destination({self.label!r})"


def parse_destination(text: str) -> Destination:
    """One ``dimse://AET@host:port`` or ``http(s)://host[:port]/…/dicom-web`` STOW root."""
    text = text.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "dimse":
        ae, sep, hostport = parts.netloc.rpartition("@")
        if not sep or not ae:
            raise ValueError(f"{text!r}: a DIMSE destination is dimse://AET@host:port")
        try:
            check_ae_title(ae)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        try:
            probe = urlsplit(f"//{hostport}")
            host, port = probe.hostname, probe.port
        except ValueError as exc:
            raise ValueError(f"{text!r}: bad host or port ({exc})") from None
        if not host or port is None or port == 0:
            raise ValueError(f"{text!r}: a DIMSE destination needs host and port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{text!r}: a DIMSE destination has no path")
        return Destination("dimse", f"dimse://{ae}@{hostport}", host, port, ae)
    if scheme in ("http", "https"):
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"{text!r}: bad port ({exc})") from None
        if not host:
            raise ValueError(f"{text!r}: a STOW-RS root needs a host")
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: a STOW-RS root has no query or fragment")
        root = text.rstrip("/")
        return Destination("stow", root, host, port or (443 if scheme == "https" else 80))
    raise ValueError(f"{text!r}: use dimse://AET@host:port or an http(s):// STOW-RS root")


def parse_destinations(text: str | None) -> list[Destination]:
    """``CXR_DESTINATIONS``: comma-separated destinations; empty means keep results local."""
    if text is None or not text.strip():
        return []
    found = [parse_destination(part) for part in text.split(",") if part.strip()]
    labels = [d.label for d in found]
    if len(set(labels)) != len(labels):
        raise ValueError("CXR_DESTINATIONS names the same destination twice")
    return found
