"""Real study results for the pacs-out tests: factory DICOMs of shared NIH images, the
eligibility gate, the served default model through ONNX Runtime, and the same per-finding
maximum and heatmap choice as the study scorer. Also a pynetdicom fake PACS and DCMTK helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from app.api.schemas import Triage
from app.card import ModelCard
from app.imaging.decode import DecodeError
from app.imaging.eligibility import check_eligibility
from app.imaging.heatmap import explained_label, select_map
from app.imaging.prepare import prepare
from app.inference.runtime import ModelRuntime
from app.inference.scoring import score
from app.pacs.model import Explained, InstanceOutcome, InstanceStatus, StudyResult
from app.settings import DEFAULT_MODEL_DIR
from tests.dicom_factory import make_study, to_bytes


def default_runtime() -> ModelRuntime:
    return ModelRuntime.load(DEFAULT_MODEL_DIR, providers="cpu", intra_op_threads=1)


def store_study(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as a Part 10 file, as the receiving side stores them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_bytes(ds))
        paths.append(path)
    return paths


def score_study(
    paths: Sequence[Path],
    runtime: ModelRuntime,
    *,
    revision: int = 1,
    supersedes: Sequence[str] = (),
    priority: str = "ROUTINE",
) -> StudyResult:
    """Gate, score and combine stored instances exactly as the study scorer does."""
    card: ModelCard = runtime.card
    outcomes: list[InstanceOutcome] = []
    logits: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    scored_uids: list[str] = []
    for path in paths:
        data = path.read_bytes()
        ds = dcmread(path)
        gate = check_eligibility(ds)
        status = InstanceStatus.SCORED if gate.eligible else InstanceStatus.INELIGIBLE
        reason = None if gate.eligible else gate.reason
        prepared = None
        if gate.eligible:
            try:
                prepared = prepare(data, "application/dicom", card, 60_000_000)
            except DecodeError as exc:
                status, reason = InstanceStatus.UNDECODABLE, exc.detail
        outcomes.append(
            InstanceOutcome(
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                path=path,
                status=status,
                reason=reason,
                pixel_hash=hashlib.sha256(ds.PixelData).hexdigest(),
            )
        )
        if prepared is not None:
            out_logits, out_maps = runtime.run(prepared.model_input[None])
            logits.append(out_logits[0])
            maps.append(out_maps[0])
            scored_uids.append(ds.SOPInstanceUID)
    explained = None
    if logits:
        stacked = np.stack(logits)
        findings, triage = score(card, stacked.max(axis=0))
        flagged = triage.diagnosis_positive or triage.screening_positive
        label = explained_label(card.labels, [f.probability for f in findings], flagged)
        index = card.labels.index(label)
        best = int(np.argmax(stacked[:, index]))
        explained = Explained(
            sop_instance_uid=scored_uids[best],
            label=label,
            probability=findings[index].probability,
            grid=select_map(maps[best], index),
        )
    else:  # nothing eligible: no findings, no heatmap (what the study scorer hands over)
        findings, triage = [], Triage(screening_positive=[], diagnosis_positive=[], abnormal=False)
    return StudyResult(
        study_instance_uid=str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID),
        model_name=card.name,
        model_version=card.version,
        findings=findings,
        triage=triage,
        priority=priority,
        instances=outcomes,
        explained=explained,
        supersedes=list(supersedes),
        revision=revision,
    )


def pa_lateral_study(pngs: Sequence[Path], folder: Path, **options: Any) -> list[Path]:
    """A PA and a lateral of one (fake) patient, stored."""
    return store_study(make_study(list(pngs[:2]), views=("PA", "LL"), **options), folder)


# ------------------------------------------------------------------------------ networking


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it is truthy (and return it) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class FakePacs:
    """An in-process pynetdicom storage SCP that keeps what it receives (by SOP UID)."""

    ae_title: str = "FAKEPACS"
    port: int = 0
    status_for: Callable[[Dataset], int] = lambda ds: 0x0000
    ssl_context: Any = None  # a server ssl.SSLContext: DICOM TLS
    received: dict[str, list[Dataset]] = field(default_factory=dict)
    calling_aes: list[str] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakePacs:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self.ssl_context,
        )
        self.port = int(self._server.server_address[1])
        return self

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.status_for(ds)
        with self._lock:
            self.calling_aes.append(event.assoc.requestor.ae_title)
            if status == 0x0000:
                self.received.setdefault(str(ds.SOPInstanceUID), []).append(ds)
        return status

    @property
    def url(self) -> str:
        return f"dimse://{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def dimse_echo(port: int, ae_title: str) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


@dataclass
class StoreScp:
    """DCMTK ``storescp`` writing what it receives into ``folder``; stopped by PID."""

    folder: Path
    port: int
    ae_title: str = "STORESCP"
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScp:
        exe = shutil.which("storescp")
        assert exe is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder.parent / f"storescp-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [exe, "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             "--unique-filenames", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: dimse_echo(self.port, self.ae_title), what="storescp to answer C-ECHO")
        return self

    @property
    def url(self) -> str:
        return f"dimse://{self.ae_title}@127.0.0.1:{self.port}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def sop_uids(self) -> list[str]:
        return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


# --------------------------------------------------------------------------------- Orthanc

ORTHANC_EXE = "/usr/sbin/Orthanc"
ORTHANC_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"
ORTHANC_AUTH = ("demo", "demo")  # deploy/orthanc/orthanc.json's demo user


def orthanc_available() -> str | None:
    """Why an Orthanc test cannot run here, or None when it can."""
    exe = shutil.which("Orthanc") or (ORTHANC_EXE if Path(ORTHANC_EXE).is_file() else None)
    if exe is None:
        return "Orthanc not installed (apt-get install orthanc orthanc-dicomweb)"
    plugins = [Path(p) for p in ("/usr/share/orthanc/plugins", "/usr/local/share/orthanc/plugins")]
    if not any(p.is_dir() and any(p.glob("libOrthancDicomWeb*")) for p in plugins):
        return "Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    """A real Orthanc on loopback ports, configured from ``deploy/orthanc`` (the demo PACS of
    docker-compose), with its storage in ``root``; stopped by PID."""

    root: Path
    http_port: int
    dicom_port: int
    triage_port: int
    triage_host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        config = json.loads((ORTHANC_CONFIG / "orthanc.json").read_text())
        config.update(
            {
                "StorageDirectory": str(self.root / "db"),
                "IndexDirectory": str(self.root / "db"),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "RemoteAccessAllowed": False,
                "DicomModalities": {
                    "cxr-triage": ["CXR_TRIAGE", self.triage_host, self.triage_port]
                },
                "LuaScripts": [str(ORTHANC_CONFIG / "route-to-cxr-triage.lua")],
            }
        )
        return config

    def start(self) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        exe = shutil.which("Orthanc") or ORTHANC_EXE
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen([exe, str(path)], stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited:\n{self.log()[-3000:]}")
            try:
                return self.client().get("/system").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, what="Orthanc's REST API")
        return self

    def log(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=ORTHANC_AUTH, timeout=30)

    def series(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's series: Orthanc ids, Modality, ParentStudy and instance ids."""
        with self.client() as client:
            found = client.post(
                "/tools/find",
                json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            )
        found.raise_for_status()
        return found.json()

    def file(self, instance_id: str) -> bytes:
        with self.client() as client:
            response = client.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
