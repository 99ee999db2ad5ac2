"""The acceptance flow end to end, on a real ``cxr-triage serve`` process: studies in by DCMTK
storescu, pynetdicom and STOW-RS; SR + SC out to a pynetdicom PACS and to DCMTK storescp;
GET /v1/studies says delivered; a resend is a duplicate; a destination that is down and two
crashes (SIGKILL) later, every study has exactly one SR and one SC at every destination.

Marked slow: four service start-ups and an Orthanc (about 45 s on a quiet 2-core machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from app.settings import DEFAULT_MODEL_DIR
from tests.dicom_factory import make_dataset, make_study, nih_pngs, to_bytes
from tests.live_server import LiveServer, start_server
from tests.pacs_in_fixtures import (
    PATIENT_VALUES,
    c_store,
    dcmtk,
    statuses,
    storescu,
    stow_body,
    write_files,
)
from tests.pacs_out_fixtures import FakePacs, StoreScp, free_port, wait_for

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def serve(tmp: Path, port: int, destinations: str, stable_s: float) -> LiveServer:
    env = {
        "CXR_PACS_ENABLED": "true",
        "CXR_DICOM_PORT": str(port),
        "CXR_STUDY_STABLE_S": str(stable_s),
        "CXR_PACS_STORAGE_DIR": str(tmp / "pacs"),
        "CXR_OUTBOX_DB": str(tmp / "pacs" / "outbox.sqlite"),
        "CXR_AUDIT_DB": str(tmp / "audit.sqlite"),
        "CXR_DESTINATIONS": destinations,
        "CXR_PROVIDERS": "cpu",
    }
    return start_server(DEFAULT_MODEL_DIR, tmp, env=env)


def study(server: LiveServer, uid: str) -> dict[str, Any] | None:
    response = httpx.get(f"{server.url}/v1/studies/{uid}", timeout=30)
    return response.json() if response.status_code == 200 else None


def wait_state(server: LiveServer, uid: str, check: Any, what: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = study(server, uid)
        return body if body is not None and check(body) else None

    return wait_for(ready, timeout=120, what=what)


def all_delivered(body: dict[str, Any]) -> bool:
    return body["state"] == "delivered" and all(
        r["delivery"] == "delivered" for r in body["results"]
    )


def kill(server: LiveServer) -> None:
    """A crash: SIGKILL, no shutdown code runs."""
    os.kill(server.pid, signal.SIGKILL)
    server.process.wait(30)


def kinds_by_study(datasets: list[Any]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for ds in datasets:
        kind = "sr" if str(ds.SOPClassUID) == SR_CLASS else "sc"
        out.setdefault(str(ds.StudyInstanceUID), Counter())[kind] += 1
    return out


def test_acceptance_flow(tmp_path: Path, data_dir: Path) -> None:
    dcmtk("storescp")
    pngs = nih_pngs(data_dir)
    fake = FakePacs().start()
    storescp = StoreScp(tmp_path / "storescp", free_port()).start()
    destinations = f"{fake.url},{storescp.url}"
    dicom_port = free_port()
    servers: list[LiveServer] = []
    try:
        servers.append(serve(tmp_path, dicom_port, destinations, stable_s=0.5))
        server = servers[-1]
        # A: a PA and a lateral by DCMTK storescu; B: a PA by pynetdicom; C: a PA by STOW-RS.
        a_pa, a_lat = make_study(pngs[20:22], views=("PA", "LL"))
        done = storescu(dicom_port, write_files([a_pa, a_lat], tmp_path / "a"))
        assert done.returncode == 0, done.stderr
        b = make_dataset(pngs[22], modality="CR")
        assert c_store(dicom_port, [b]) == [0]
        c = make_dataset(pngs[23])
        body, content_type = stow_body([to_bytes(c)])
        stowed = httpx.post(
            f"{server.url}/dicomweb/studies",
            content=body,
            headers={"Content-Type": content_type},
            timeout=60,
        )
        assert stowed.status_code == 200, stowed.text
        for ds in (a_pa, b, c):
            got = wait_state(server, ds.StudyInstanceUID, all_delivered, "delivered")
            assert len(got["results"]) == 4  # SR + SC, at two destinations
        a_body = study(server, a_pa.StudyInstanceUID)
        assert a_body is not None
        assert statuses(a_body) == {
            a_pa.SOPInstanceUID: "scored",
            a_lat.SOPInstanceUID: "ineligible",
        }
        # The same image again: a duplicate, nothing re-sent.
        assert c_store(dicom_port, [a_pa]) == [0]
        again = study(server, a_pa.StudyInstanceUID)
        assert again is not None and again["state"] == "delivered"
        assert "duplicate" in [i["status"] for i in again["instances"]]

        # E: the storescp PACS is down; the other destination still gets it at once.
        storescp.stop()
        e = make_dataset(pngs[24])
        assert c_store(dicom_port, [e]) == [0]
        wait_state(
            server,
            e.StudyInstanceUID,
            lambda b: (
                Counter(r["delivery"] for r in b["results"])
                == Counter({"delivered": 2, "pending": 2})
            ),
            "E delivered to one destination, pending at the other",
        )
        kill(server)

        # F: stored by a service that crashes before the stable window ends.
        servers.append(serve(tmp_path, dicom_port, destinations, stable_s=3600))
        f = make_dataset(pngs[25])
        assert c_store(dicom_port, [f]) == [0]
        kill(servers[-1])

        storescp.start()
        servers.append(serve(tmp_path, dicom_port, destinations, stable_s=0.5))
        server = servers[-1]
        for ds in (e, f):
            got = wait_state(server, ds.StudyInstanceUID, all_delivered, "delivered after restart")
            assert len(got["results"]) == 4
        for ds in (a_pa, b, c):
            body_ = study(server, ds.StudyInstanceUID)
            assert body_ is not None and body_["state"] == "delivered"

        studies = {ds.StudyInstanceUID for ds in (a_pa, b, c, e, f)}
        with fake._lock:
            at_fake = [copies[0] for copies in fake.received.values()]
            assert all(len(copies) == 1 for copies in fake.received.values())
        at_storescp = [pydicom.dcmread(p, stop_before_pixels=True) for p in storescp.files()]
        for received in (at_fake, at_storescp):
            counts = kinds_by_study(received)
            assert set(counts) == studies
            assert all(c == Counter({"sr": 1, "sc": 1}) for c in counts.values()), counts
        log = "".join(s.log() for s in servers)
        for value in PATIENT_VALUES:
            assert value not in log
    finally:
        for s in servers:
            s.stop()
        storescp.stop()
        fake.stop()


def test_orthanc_routes_resends_and_pushes_by_stow_rs(tmp_path: Path, data_dir: Path) -> None:
    """With a real Orthanc as the PACS (deploy/orthanc's config and Lua route): a routed study
    gets one SR + one SC back; Orthanc routing the same image again is a duplicate (nothing new
    in Orthanc); Orthanc's own STOW-RS client pushing a study to the service works the same."""
    from tests.pacs_out_fixtures import Orthanc, orthanc_available

    missing = orthanc_available()
    if missing is not None:
        pytest.skip(missing)
    dcmtk("storescu")
    pngs = nih_pngs(data_dir)
    http_port, orthanc_port, triage_port = free_port(), free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", http_port, orthanc_port, triage_port).start()
    server = None
    try:
        server = serve(tmp_path, triage_port, f"dimse://ORTHANC@127.0.0.1:{orthanc_port}", 0.5)

        def in_orthanc(uid: str) -> Counter[str]:
            """Instances per modality in Orthanc's copy of the study."""
            counts: Counter[str] = Counter()
            for series in orthanc.series(uid):
                counts[series["MainDicomTags"].get("Modality", "")] += len(series["Instances"])
            return counts

        def into_orthanc(paths: list[Path]) -> None:
            cmd = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1"]
            done = subprocess.run(
                [*cmd, str(orthanc_port), *map(str, paths)], capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr

        pa = make_dataset(pngs[30])
        files = write_files([pa], tmp_path / "pa")
        into_orthanc(files)
        wait_state(server, pa.StudyInstanceUID, all_delivered, "the routed study delivered")
        wait_for(
            lambda: in_orthanc(pa.StudyInstanceUID) == {"DX": 1, "SR": 1, "OT": 1},
            what="one SR and one SC in Orthanc's copy of the study",
        )
        # Orthanc routes the same image again: a duplicate, nothing new comes back.
        into_orthanc(files)
        again = wait_state(
            server,
            pa.StudyInstanceUID,
            lambda b: "duplicate" in [i["status"] for i in b["instances"]],
            "the resend seen as a duplicate",
        )
        assert again["state"] == "delivered" and len(again["results"]) == 2
        assert in_orthanc(pa.StudyInstanceUID) == {"DX": 1, "SR": 1, "OT": 1}

        # Orthanc's DICOMweb client pushes a study (an OT secondary capture, which the Lua
        # route leaves alone) to POST /dicomweb/studies.
        sc = make_dataset(pngs[31], modality="OT")
        with orthanc.client() as client:
            put = client.put(
                "/dicom-web/servers/cxr-triage", json={"Url": f"{server.url}/dicomweb/"}
            )
            assert put.status_code == 200, put.text
            uploaded = client.post("/instances", content=to_bytes(sc))
            assert uploaded.status_code == 200, uploaded.text
            pushed = client.post(
                "/dicom-web/servers/cxr-triage/stow",
                json={"Resources": [uploaded.json()["ParentStudy"]], "Synchronous": True},
            )
            assert pushed.status_code == 200, pushed.text
        body = wait_state(server, sc.StudyInstanceUID, all_delivered, "the STOW study delivered")
        assert statuses(body) == {sc.SOPInstanceUID: "scored"}
        wait_for(
            lambda: in_orthanc(sc.StudyInstanceUID) == {"OT": 2, "SR": 1},
            what="one SR and one SC in Orthanc's copy of the STOW study",
        )
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()
