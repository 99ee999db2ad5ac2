"""Helpers for the pacs-in tests: the real app with its DICOM side on, a pynetdicom SCU, DCMTK,
STOW-RS bodies, and polling ``GET /v1/studies`` until a state holds (never fixed sleeps)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from tests.dicom_factory import (
    FAKE_ACCESSION,
    FAKE_BIRTH_DATE,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    to_bytes,
)
from tests.pacs_out_fixtures import free_port, wait_for

AE_TITLE = "CXR_TRIAGE"
KEY = "pacs-in-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
PATIENT_VALUES = (
    FAKE_PATIENT_NAME,
    "PATIENT^TESTONLY",
    FAKE_PATIENT_ID,
    FAKE_BIRTH_DATE,
    FAKE_ACCESSION,
    "FAKE HOSPITAL",
    "FAKE^REFERRER",
)


def pacs_settings(folder: Path, **overrides: Any) -> Settings:
    """The served default model on CPU, the PACS side on a free port, all state under
    ``folder``; a 0.2 s stable window so studies are scored promptly."""
    base: dict[str, Any] = {
        "model_dir": DEFAULT_MODEL_DIR,
        "providers": "cpu",
        "intra_op_threads": 1,
        "pacs_enabled": True,
        "dicom_port": free_port(),
        "dicom_ae_title": AE_TITLE,
        "study_stable_s": 0.2,
        "pacs_storage_dir": folder / "pacs",
        "outbox_db": folder / "pacs" / "outbox.sqlite",
        "audit_db": folder / "audit.sqlite",
        "destinations": "",
        "log_json": False,
    }
    base.update(overrides)
    return Settings(**base)


@dataclass
class PacsApp:
    client: TestClient
    settings: Settings

    @property
    def port(self) -> int:
        return self.settings.dicom_port

    @property
    def service(self) -> Any:
        return self.client.app.state.pacs  # type: ignore[attr-defined]

    def study(self, uid: str, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
        response = self.client.get(f"/v1/studies/{uid}", headers=headers or self.headers)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return response.json()

    @property
    def headers(self) -> dict[str, str]:
        return AUTH if self.settings.api_keys else {}

    def wait_study(
        self,
        uid: str,
        until: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 60.0,
        what: str = "the study",
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            body = self.study(uid)
            return body if body is not None and until(body) else None

        return wait_for(check, timeout=timeout, what=what)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        text = self.client.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0


@contextmanager
def running_app(settings: Settings) -> Iterator[PacsApp]:
    with TestClient(create_app(settings)) as client:
        yield PacsApp(client, settings)


def settled(states: Sequence[str] = ("scored", "delivered")) -> Callable[[dict[str, Any]], bool]:
    return lambda body: body["state"] in states


def statuses(body: dict[str, Any]) -> dict[str, str]:
    """SOP Instance UID -> status, for the instances (not the duplicate receipts)."""
    out: dict[str, str] = {}
    for inst in body["instances"]:
        out.setdefault(inst["sop_instance_uid"], inst["status"])
    return out


# ------------------------------------------------------------------------------ DIMSE SCU


def scu_ae(calling: str = "TESTSCU", contexts: Sequence[str] | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    if contexts is None:
        ae.add_requested_context(Verification)
        for cx in AllStoragePresentationContexts[:120]:
            ae.add_requested_context(cx.abstract_syntax)
    else:
        for uid in contexts:
            ae.add_requested_context(uid)
    return ae


def c_store(
    port: int, datasets: Sequence[Dataset], *, calling: str = "TESTSCU", called: str = AE_TITLE
) -> list[int]:
    """Send ``datasets`` in one association; each one's C-STORE status."""
    ae = scu_ae(calling, contexts=sorted({str(ds.SOPClassUID) for ds in datasets}))
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not established"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def c_echo(port: int, *, calling: str = "TESTSCU", called: str = AE_TITLE) -> int | None:
    """The C-ECHO status, or None when the association was not established."""
    ae = scu_ae(calling, contexts=[Verification])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


# ------------------------------------------------------------------------------ DCMTK


def dcmtk(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"DCMTK {tool} is not installed (Debian package dcmtk)")
    return exe


def storescu(
    port: int, files: Sequence[Path], *, calling: str = "STORESCU", options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` as a radiology IT engineer would type it (``options`` e.g. ``-xv`` to
    propose JPEG 2000 lossless: plain storescu proposes uncompressed syntaxes only)."""
    cmd = [dcmtk("storescu"), *options, "-aet", calling, "-aec", AE_TITLE, "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def write_files(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_bytes(ds))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ STOW-RS


def stow_body(parts: Sequence[bytes], *, part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body of ``parts`` and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


def sop_uids_in(seq: dict[str, Any] | None) -> list[str]:
    """The ReferencedSOPInstanceUIDs of a DICOM JSON sequence element."""
    if not seq:
        return []
    return [item["00081155"]["Value"][0] for item in seq.get("Value", []) if "00081155" in item]
