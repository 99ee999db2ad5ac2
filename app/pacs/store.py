"""Received instances on disk: parsed, checked, then written durably before anyone says "stored".

A C-STORE success status (0x0000) or a STOW-RS ReferencedSOPSequence item tells the sender it
may forget the instance, so the file must already be on disk: written to a temporary file in the
same file system, fsynced, renamed over its final name (atomic), and the directory fsynced.
A crash at any point leaves either the old file or the new one, never half of one.

Layout: ``<root>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (a UID that is not digits and dots is
replaced by its SHA-256, so nothing from a header becomes a path it should not). Files are
readable by the service user only: they hold patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

# C-STORE failure statuses (PS3.4 Annex B.2.3), also the STOW-RS FailureReason (PS3.18 10.5.3).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class StoreRefused(Exception):
    """An instance that is not stored; ``status`` is the DIMSE status / STOW FailureReason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ParsedInstance:
    """What the assembler needs of a received instance: UIDs and the pixel hash, no patient data."""

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    pixel_hash: str


def is_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID.match(value))


def parse_instance(data: bytes) -> ParsedInstance:
    """Read a DICOM Part 10 file's UIDs and hash its PixelData; :class:`StoreRefused` if unusable.

    The pixel hash is SHA-256 over the PixelData element's value as encoded (native or
    encapsulated), so the same image resent in the same transfer syntax hashes the same.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        meta = ds.file_meta
        values = {keyword: str(ds.get(keyword, "") or "").strip() for keyword in _REQUIRED}
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "").strip()
        digest = pixel_hash(ds)
    except (InvalidDicomError, EOFError) as exc:
        raise StoreRefused(
            CANNOT_UNDERSTAND, f"not a DICOM Part 10 file ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # pydicom raises many types on broken headers
        raise StoreRefused(
            CANNOT_UNDERSTAND, f"the DICOM header cannot be read ({type(exc).__name__})"
        ) from None
    missing = [keyword for keyword, value in values.items() if not value]
    if missing:
        raise StoreRefused(CANNOT_UNDERSTAND, f"missing {', '.join(missing)}")
    bad = [keyword for keyword, value in values.items() if not is_uid(value)]
    if bad:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{', '.join(bad)} is not a valid UID")
    if not transfer_syntax:
        raise StoreRefused(CANNOT_UNDERSTAND, "the file meta has no TransferSyntaxUID")
    media_sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    if media_sop and media_sop != values["SOPInstanceUID"]:
        raise StoreRefused(
            DATASET_DOES_NOT_MATCH, "MediaStorageSOPInstanceUID differs from SOPInstanceUID"
        )
    return ParsedInstance(
        data=data,
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        pixel_hash=digest,
    )


def pixel_hash(ds: Dataset) -> str:
    """SHA-256 hex of the PixelData value ("" for an instance without pixels)."""
    element = ds.get((0x7FE0, 0x0010))
    if element is None or element.value is None:
        return ""
    return hashlib.sha256(bytes(element.value)).hexdigest()


def safe_name(uid: str) -> str:
    """A UID as a file name: itself when it is digits and dots, else its SHA-256."""
    return uid if is_uid(uid) else hashlib.sha256(uid.encode()).hexdigest()


class InstanceStore:
    """Durable, atomic storage of received Part 10 files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._tmp = self.root / ".incoming"

    def open(self) -> None:
        """Create the folders (service user only) and clear temporary files a crash left."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp.mkdir(exist_ok=True, mode=0o700)
        for leftover in self._tmp.glob("*.part"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def write(self, instance: ParsedInstance) -> Path:
        """Write ``instance`` durably; returns its final path. ``StoreRefused`` (0xA700) on I/O."""
        final = self.path_for(instance.study_instance_uid, instance.sop_instance_uid)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            new_dir = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(instance.data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            if new_dir:
                _fsync_dir(final.parent.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            logger.error("instance not stored: %s", exc.strerror or type(exc).__name__)
            raise StoreRefused(
                OUT_OF_RESOURCES, "the instance could not be written to disk"
            ) from None
        return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
