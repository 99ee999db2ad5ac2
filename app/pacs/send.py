"""Senders: put result objects into a PACS by DIMSE C-STORE (pynetdicom) or STOW-RS (httpx).

A sender answers for each object whether the destination now holds it, and when it does not,
whether trying again can help (``permanent``): the outbox retries transient failures (the PACS
is down, busy, or an association broke) with backoff and marks permanent ones (the PACS
refused this object) failed. Neither sender ever logs dataset contents.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from app.pacs.model import Destination

logger = logging.getLogger(__name__)

# DICOM JSON tags of a PS3.18 store response.
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILURE_REASON = "00081197"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_RETRY_HTTP = frozenset({401, 403, 404, 408, 425, 429})


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one object: stored, or not and whether a retry may help.

    ``tried`` is False for an object never put on the wire (its batch's association broke
    first): that costs it no attempt and no backoff.
    """

    ok: bool
    detail: str = ""
    permanent: bool = False
    tried: bool = True


class Sender(Protocol):
    destination: Destination

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        """Send each file; one outcome per path, in order. Never raises for network errors."""
        ...

    def close(self) -> None: ...


def sender_for(
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Sender:
    """The sender a configured destination needs."""
    if destination.kind == "dimse":
        return DimseSender(
            destination,
            calling_ae_title=calling_ae_title,
            timeout_s=timeout_s,
            ssl_context=ssl_context,
        )
    return StowSender(destination, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------ DIMSE


class DimseSender:
    """C-STORE SCU: one association per batch, our AE title as calling AE, statuses checked.

    ``ssl_context`` (a client context) runs the association over TLS (PS3.15 B.1).
    """

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae_title: str,
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if destination.kind != "dimse" or not destination.ae_title:
            raise ValueError(f"{destination}: not a DIMSE destination")
        self.destination = destination
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        outcomes: dict[int, SendOutcome] = {}
        datasets: dict[int, Dataset] = {}
        for index, path in enumerate(paths):
            try:
                datasets[index] = dcmread(path)
            except (OSError, InvalidDicomError, ValueError) as exc:
                outcomes[index] = SendOutcome(
                    False, f"unreadable file ({type(exc).__name__})", True
                )
        if datasets:
            outcomes.update(self._store(datasets))
        return [outcomes[i] for i in range(len(paths))]

    def close(self) -> None:
        """Nothing held between batches: each batch opens its own association."""

    def _store(self, datasets: dict[int, Dataset]) -> dict[int, SendOutcome]:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls = (self.ssl_context, self.destination.host) if self.ssl_context else None
        try:
            assoc = ae.associate(
                self.destination.host,
                self.destination.port,
                ae_title=str(self.destination.ae_title),
                tls_args=tls,
            )
        except (OSError, RuntimeError, ValueError) as exc:
            return dict.fromkeys(datasets, SendOutcome(False, f"connect failed ({exc})"))
        if not assoc.is_established:
            why = (
                "association rejected"
                if assoc.is_rejected
                else "association aborted"
                if assoc.is_aborted
                else "no association (destination unreachable)"
            )
            return dict.fromkeys(datasets, SendOutcome(False, why))
        outcomes: dict[int, SendOutcome] = {}
        dropped = False
        try:
            for index, ds in datasets.items():
                if dropped or not assoc.is_established:
                    # Sending on an association the peer dropped would only wait out the
                    # DIMSE timeout: the rest of the batch goes with the next attempt.
                    outcomes[index] = SendOutcome(
                        False, "association ended before this object", tried=False
                    )
                    continue
                outcomes[index], answered = self._store_one(assoc, ds)
                # No answer means the association is gone, even while pynetdicom still
                # reports it established for a moment.
                dropped = not answered or not assoc.is_established
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    @staticmethod
    def _store_one(assoc: Any, ds: Dataset) -> tuple[SendOutcome, bool]:
        """The outcome, and whether the peer answered at all."""
        try:
            status = assoc.send_c_store(ds)
        except ValueError as exc:  # no accepted presentation context for this SOP class
            return SendOutcome(False, f"not accepted by the destination ({exc})", True), True
        except (RuntimeError, OSError) as exc:
            return SendOutcome(False, f"C-STORE failed ({type(exc).__name__})"), False
        return dimse_outcome(status), "Status" in status


def dimse_outcome(status: Dataset) -> SendOutcome:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 C)."""
    if "Status" not in status:
        return SendOutcome(False, "no C-STORE response (timeout or association aborted)")
    code = int(status.Status)
    if code == 0x0000:
        return SendOutcome(True, "0x0000")
    if code in (0xB000, 0xB006, 0xB007):
        return SendOutcome(True, f"stored with warning 0x{code:04X}")
    return SendOutcome(False, f"status 0x{code:04X}", not transient_status(code))


def transient_status(code: int) -> bool:
    """Whether a storage failure status may clear by itself: out of resources (0xA7xx) or a
    resource limitation (0x0213). Everything else (0xA9xx data set does not match, 0xCxxx cannot
    understand, 0x01xx refused) is about the object and will not."""
    return 0xA700 <= code <= 0xA7FF or code == 0x0213


# --------------------------------------------------------------------------------- STOW-RS


class StowSender:
    """STOW-RS client: POST ``{root}/studies`` as ``multipart/related; type="application/dicom"``,
    one object per request so each gets its own answer; the PS3.18 response is checked for the
    object's SOP Instance UID. Credentials in the URL (``https://user:pw@host/...``) become HTTP
    basic auth and never reach a log."""

    def __init__(
        self,
        destination: Destination,
        *,
        timeout_s: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        if destination.kind != "stow":
            raise ValueError(f"{destination}: not a STOW-RS destination")
        self.destination = destination
        parts = urlsplit(destination.url)
        auth = None
        if parts.username is not None:
            auth = httpx.BasicAuth(unquote(parts.username), unquote(parts.password or ""))
        netloc = parts.netloc.rpartition("@")[2]
        root = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.url = f"{root}/studies"
        self._client = client or httpx.Client(timeout=timeout_s, auth=auth)

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        return [self._send_one(path) for path in paths]

    def close(self) -> None:
        self._client.close()

    def _send_one(self, path: Path) -> SendOutcome:
        try:
            data = path.read_bytes()
            sop_uid = str(
                dcmread(
                    path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                ).SOPInstanceUID
            )
        except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
            return SendOutcome(False, f"unreadable file ({type(exc).__name__})", True)
        boundary = uuid.uuid4().hex
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return SendOutcome(False, f"STOW-RS request failed ({type(exc).__name__})")
        return stow_outcome(response.status_code, _json_or_none(response), sop_uid)


def stow_outcome(status: int, body: Any, sop_instance_uid: str) -> SendOutcome:
    """Classify a STOW-RS answer for one instance (PS3.18 10.5.3: 200 all stored, 202 some
    failed, 409 none stored)."""
    failed = {uid: reason for uid, reason in _sop_items(body, _FAILED_SOP_SEQUENCE)}
    stored = {uid for uid, _ in _sop_items(body, _REFERENCED_SOP_SEQUENCE)}
    if status in (200, 202) and sop_instance_uid not in failed:
        if stored and sop_instance_uid not in stored:
            return SendOutcome(False, f"HTTP {status} without this instance in the response")
        return SendOutcome(True, f"HTTP {status}")
    if sop_instance_uid in failed or status == 409:
        reason = failed.get(sop_instance_uid)
        code = reason if isinstance(reason, int) else None
        detail = f"HTTP {status}, not stored" + (f" (FailureReason 0x{code:04X})" if code else "")
        return SendOutcome(False, detail, code is None or not transient_status(code))
    if status >= 500 or status in _RETRY_HTTP:
        return SendOutcome(False, f"HTTP {status}")
    return SendOutcome(False, f"HTTP {status}", True)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _sop_items(body: Any, tag: str) -> list[tuple[str, Any]]:
    """(SOP Instance UID, failure reason) of each item of a DICOM JSON sequence."""
    if not isinstance(body, dict):
        return []
    items = (body.get(tag) or {}).get("Value") or []
    found = []
    for item in items:
        if not isinstance(item, dict):
            continue
        uid = ((item.get(_REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [None])[0]
        reason = ((item.get(_FAILURE_REASON) or {}).get("Value") or [None])[0]
        if isinstance(uid, str):
            found.append((uid, reason))
    return found
