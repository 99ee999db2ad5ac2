"""End to end with a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) configured
from ``deploy/orthanc`` (the docker-compose demo PACS and its Lua auto-routing), and the real
service (``cxr-triage serve`` in its own process) with its DICOM side on.

A modality (DCMTK ``storescu``) stores a PA + lateral study into Orthanc; Orthanc routes the
radiographs to the service; the service scores the study and C-STOREs an SR and a secondary
capture back, which must land in the same Orthanc study. Also: results for a study sent while
Orthanc is down arrive once it is back, and STOW-RS into Orthanc's DICOMweb works as a
destination. Skips with a reason where Orthanc or DCMTK is missing.
"""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from app.pacs.model import parse_destination
from app.pacs.outbox import Outbox
from app.pacs.results import STATEMENT, write_results
from app.settings import DEFAULT_MODEL_DIR
from tests.dicom_factory import make_study, nih_pngs
from tests.live_server import LiveServer, start_server
from tests.pacs_out_fixtures import (
    ORTHANC_AUTH,
    Orthanc,
    default_runtime,
    free_port,
    orthanc_available,
    score_study,
    store_study,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,  # ~30 s: a service process, an Orthanc started twice
    pytest.mark.skipif(orthanc_available() is not None, reason=str(orthanc_available())),
    pytest.mark.skipif(
        not (shutil.which("storescu") and shutil.which("dsrdump")),
        reason="DCMTK storescu/dsrdump not installed (apt-get install dcmtk)",
    ),
]


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"http": free_port(), "dicom": free_port(), "triage": free_port()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[Orthanc]:
    pacs = Orthanc(
        tmp_path_factory.mktemp("orthanc"), ports["http"], ports["dicom"], ports["triage"]
    )
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int], orthanc: Orthanc
) -> Iterator[LiveServer]:
    """The service as ``make serve`` runs it, C-STOREing its results back to Orthanc."""
    state = tmp_path_factory.mktemp("service")
    server = start_server(
        DEFAULT_MODEL_DIR,
        state,
        env={
            "CXR_PACS_ENABLED": "true",
            "CXR_DICOM_PORT": str(ports["triage"]),
            "CXR_DICOM_AE_TITLE": "CXR_TRIAGE",
            "CXR_DICOM_ALLOWED_AES": "ORTHANC,MODALITY",
            "CXR_DESTINATIONS": f"dimse://ORTHANC@127.0.0.1:{ports['dicom']}",
            "CXR_STUDY_STABLE_S": "1",
            "CXR_PACS_STORAGE_DIR": str(state / "pacs"),
            "CXR_OUTBOX_DB": str(state / "pacs" / "outbox.sqlite"),
            "CXR_AUDIT_DB": str(state / "audit.sqlite"),
        },
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pngs(data_dir: Path) -> list[Path]:
    found = nih_pngs(data_dir)
    if len(found) < 5:
        pytest.skip("fewer than 5 shared 1024 px NIH images")
    return found


def storescu(port: int, called: str, paths: list[Path]) -> None:
    """What a modality does: ``storescu -aet MODALITY -aec <called> 127.0.0.1 <port> files``."""
    done = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def by_modality(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.series(study_uid):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    found = by_modality(orthanc, study_uid)
    return found if {"SR", "OT"} <= set(found) else {}


def study_state(server: LiveServer, study_uid: str) -> dict[str, Any] | None:
    response = httpx.get(f"{server.url}/v1/studies/{study_uid}", timeout=10)
    return response.json() if response.status_code == 200 else None


def delivered(server: LiveServer, study_uid: str) -> dict[str, Any] | None:
    body = study_state(server, study_uid)
    if body and body["results"] and all(r["delivery"] == "delivered" for r in body["results"]):
        return body
    return None


def dsrdump(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    done = subprocess.run(
        ["dsrdump", "+Pl", "+Pu", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def test_orthanc_routes_a_study_and_gets_one_sr_and_one_sc_back_in_it(
    orthanc: Orthanc, service: LiveServer, pngs: list[Path], tmp_path: Path
):
    study = make_study(pngs[:2], views=("PA", "LL"))
    paths = store_study(study, tmp_path / "modality")
    study_uid = study[0].StudyInstanceUID
    storescu(orthanc.dicom_port, "ORTHANC", paths)

    found = wait_for(
        lambda: results_in_orthanc(orthanc, study_uid), timeout=120, what="SR and SC in Orthanc"
    )
    body = wait_for(lambda: delivered(service, study_uid), timeout=60, what="delivered state")
    # Exactly one SR and one SC, in the Orthanc study that holds the PA and the lateral.
    assert sorted(found) == ["DX", "OT", "SR"]
    assert len(found["DX"]) == 2 and len(found["SR"]) == 1 and len(found["OT"]) == 1
    assert all(len(s["Instances"]) == 1 for s in found["SR"] + found["OT"])
    assert len({s["ParentStudy"] for group in found.values() for s in group}) == 1
    # The service says so too, with one attempt per object and Orthanc as the destination.
    assert body["state"] == "delivered"
    assert sorted(r["kind"] for r in body["results"]) == ["sc", "sr"]
    assert {r["destination"] for r in body["results"]} == {
        f"dimse://ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    }
    assert all(r["attempts"] == 1 for r in body["results"])
    label = f"dimse://ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert f'cxr_outbox_depth{{destination="{label}"}} 0.0' in metrics
    assert re.search(
        rf'cxr_outbox_delivered_total{{destination="{re.escape(label)}"}} [1-9]', metrics
    )
    statuses = {i["sop_instance_uid"]: i["status"] for i in body["instances"]}
    assert statuses == {study[0].SOPInstanceUID: "scored", study[1].SOPInstanceUID: "ineligible"}
    # dsrdump reads the SR as stored by Orthanc: the lateral is listed as not scored.
    sr_bytes = orthanc.file(found["SR"][0]["Instances"][0])
    dump = dsrdump(sr_bytes, tmp_path)
    assert f'"Comment")="{STATEMENT}"' in dump
    not_scored = dump.split('"Instance not scored")', 1)[1]
    assert study[1].SOPInstanceUID in not_scored and "LL" in not_scored
    sr = dcmread(tmp_path / "sr.dcm")
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == study[0].PatientID
    sc = dcmread(io.BytesIO(orthanc.file(found["OT"][0]["Instances"][0])))
    assert sc.BurnedInAnnotation == "YES" and (sc.Rows, sc.Columns) == (1024, 1024)


def test_a_study_sent_while_orthanc_is_down_arrives_when_it_is_back(
    orthanc: Orthanc, service: LiveServer, pngs: list[Path], tmp_path: Path
):
    study = make_study(pngs[2:3], views=("PA",))
    study_uid = study[0].StudyInstanceUID
    orthanc.stop()
    try:
        # Straight to the service, as a modality configured with its AE would.
        storescu(orthanc.triage_port, "CXR_TRIAGE", store_study(study, tmp_path / "modality"))
        pending = wait_for(
            lambda: (
                (b := study_state(service, study_uid))
                and b["results"]
                and all(r["attempts"] >= 1 and r["delivery"] == "pending" for r in b["results"])
                and b
            ),
            timeout=120,
            what="failed delivery attempts while Orthanc is down",
        )
        assert pending["state"] != "delivered"
    finally:
        orthanc.start()  # same storage, same ports
    wait_for(lambda: delivered(service, study_uid), timeout=120, what="delivery after outage")
    found = wait_for(lambda: results_in_orthanc(orthanc, study_uid), what="results in Orthanc")
    assert len(found["SR"]) == 1 and len(found["OT"]) == 1


def test_stow_rs_into_orthanc_dicomweb(orthanc: Orthanc, pngs: list[Path], tmp_path: Path):
    """STOW-RS as the destination: the outbox posts the SR and SC to Orthanc's DICOMweb root
    (basic auth from the URL), and QIDO-RS then lists them in the source study."""
    runtime = default_runtime()
    study = make_study(pngs[3:4], views=("PA",))
    paths = store_study(study, tmp_path / "in")
    objects = write_results(score_study(paths, runtime), runtime.card, tmp_path / "out")
    study_uid = study[0].StudyInstanceUID
    user, password = ORTHANC_AUTH
    destination = parse_destination(
        f"http://{user}:{password}@127.0.0.1:{orthanc.http_port}/dicom-web"
    )
    assert "demo:demo" not in destination.label

    async def deliver() -> list[dict[str, Any]]:
        outbox = Outbox(tmp_path / "outbox.sqlite", [destination])
        await outbox.start()
        try:
            outbox.enqueue(study_uid, objects)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rows = outbox.deliveries(study_uid)
                if all(r["delivery"] == "delivered" for r in rows):
                    return rows
                assert not any(r["delivery"] == "failed" for r in rows), rows
                await asyncio.sleep(0.05)
            raise AssertionError(f"not delivered: {outbox.deliveries(study_uid)}")
        finally:
            await outbox.stop()

    rows = asyncio.run(deliver())
    assert [r["attempts"] for r in rows] == [1, 1]
    with orthanc.client() as client:
        qido = client.get(
            f"/dicom-web/studies/{study_uid}/series", headers={"Accept": "application/dicom+json"}
        )
    qido.raise_for_status()
    modalities = sorted(s["00080060"]["Value"][0] for s in qido.json())
    assert modalities == ["OT", "SR"]
    stored = {
        o.kind: dcmread(io.BytesIO(orthanc.file(s["Instances"][0])))
        for o in objects
        for s in orthanc.series(study_uid)
        if s["MainDicomTags"]["SeriesInstanceUID"] == dcmread(o.path).SeriesInstanceUID
    }
    assert {k: v.SOPInstanceUID for k, v in stored.items()} == {
        o.kind: o.sop_instance_uid for o in objects
    }
