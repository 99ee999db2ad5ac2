"""Receiving: the real C-STORE/C-ECHO SCP (pynetdicom and DCMTK as SCUs) and STOW-RS through the
real HTTP app. What is acknowledged is on disk; what is refused gets a clean status; nothing of
the patient reaches the audit trail or a response."""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from app.pacs.store import safe_name
from tests.contract import BROKEN_DICOM
from tests.dicom_factory import (
    CT_IMAGE,
    DX_FOR_PROCESSING,
    make_dataset,
    make_study,
    nih_pngs,
    to_bytes,
)
from tests.pacs_in_fixtures import (
    AE_TITLE,
    AUTH,
    KEY,
    PATIENT_VALUES,
    PacsApp,
    c_echo,
    c_store,
    dcmtk,
    pacs_settings,
    running_app,
    settled,
    sop_uids_in,
    statuses,
    storescu,
    stow_body,
)

ALLOWED = ("TESTSCU", "STORESCU", "ECHOSCU")
DICOM_JSON = "application/dicom+json"


@pytest.fixture(scope="module")
def pngs(data_dir: Path) -> list[Path]:
    return nih_pngs(data_dir)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PacsApp]:
    folder = tmp_path_factory.mktemp("pacs-receive")
    settings = pacs_settings(
        folder, dicom_allowed_aes=",".join(ALLOWED), api_keys=KEY, max_upload_mb=8
    )
    with running_app(settings) as running:
        yield running


# ------------------------------------------------------------------------------ association


def test_c_echo_answers_pynetdicom_and_dcmtk(app: PacsApp) -> None:
    assert c_echo(app.port) == 0x0000
    done = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", str(app.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_unknown_calling_or_called_ae_is_rejected_cleanly(app: PacsApp) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=AE_TITLE)
    # A-ASSOCIATE-RJ, not an abort or a dropped connection.
    assert assoc.is_rejected, (assoc.is_established, assoc.is_aborted)
    assert c_echo(app.port, called="SOMEONE_ELSE") is None
    done = subprocess.run(
        [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", AE_TITLE, "127.0.0.1", str(app.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Rejected" in done.stderr or "rejected" in done.stderr.lower()
    # ...and the SCP carries on for the allowed AEs.
    assert c_echo(app.port) == 0x0000


def test_private_sop_class_is_refused_at_negotiation(app: PacsApp) -> None:
    private = "1.2.826.0.1.3680043.8.498.999.1"
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(private)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert private not in accepted
        assert str(Verification) in accepted
    finally:
        assoc.release()


# ------------------------------------------------------------------------------ C-STORE


def test_success_means_the_file_is_already_on_disk(app: PacsApp, pngs: list[Path]) -> None:
    ds = make_dataset(pngs[0])
    assert c_store(app.port, [ds]) == [0x0000]
    # No waiting: 0x0000 was sent after the write, so the file and its row exist now.
    stored = (
        app.settings.pacs_storage_dir.resolve()
        / "instances"
        / safe_name(ds.StudyInstanceUID)
        / f"{safe_name(ds.SOPInstanceUID)}.dcm"
    )
    assert stored.is_file()
    assert stored.stat().st_mode & 0o077 == 0  # patient data: the service user only
    back = pydicom.dcmread(stored)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    body = app.study(ds.StudyInstanceUID)
    assert body is not None
    assert ds.SOPInstanceUID in statuses(body)
    assert not list((stored.parents[1] / ".incoming").glob("*.part"))


def test_every_storage_class_is_stored_and_non_radiographs_listed_ineligible(
    app: PacsApp, pngs: list[Path]
) -> None:
    pa, lateral = make_study(pngs[1:3], views=("PA", "LL"))
    ct = make_dataset(pngs[3], modality="CT", study_uid=pa.StudyInstanceUID, view_position=None)
    assert ct.SOPClassUID == CT_IMAGE
    raw = make_dataset(
        pngs[3],
        study_uid=pa.StudyInstanceUID,
        sop_class=DX_FOR_PROCESSING,
        presentation_intent="FOR PROCESSING",
    )
    assert c_store(app.port, [pa, lateral, ct, raw]) == [0x0000] * 4
    body = app.wait_study(pa.StudyInstanceUID, settled(), what="the study to be scored")
    assert statuses(body) == {
        pa.SOPInstanceUID: "scored",
        lateral.SOPInstanceUID: "ineligible",
        ct.SOPInstanceUID: "ineligible",
        raw.SOPInstanceUID: "ineligible",
    }
    reasons = {i["sop_instance_uid"]: i["reason"] for i in body["instances"]}
    assert reasons[lateral.SOPInstanceUID] == "ViewPosition LL is not frontal"
    assert "SOPClassUID" in reasons[ct.SOPInstanceUID]
    assert "raw detector data" in reasons[raw.SOPInstanceUID]
    assert reasons[pa.SOPInstanceUID] is None


def test_unusable_dataset_gets_a_failure_status_and_the_scp_carries_on(
    app: PacsApp, pngs: list[Path]
) -> None:
    broken = make_dataset(pngs[4])
    del broken.StudyInstanceUID
    bad_uid = make_dataset(pngs[4])
    bad_uid.SeriesInstanceUID = "not-a-uid"
    good = make_dataset(pngs[4])
    statuses_ = c_store(app.port, [broken, bad_uid, good])
    assert statuses_[0] == 0xC000
    assert statuses_[1] == 0xC000
    assert statuses_[2] == 0x0000
    assert app.study(good.StudyInstanceUID) is not None
    assert app.metric("cxr_pacs_instances_received_total", source="c-store", outcome="refused") >= 2


def test_dcmtk_storescu_real_files(app: PacsApp, dicom_dir: Path) -> None:
    """Real CR/DX files from other systems, as storescu sends them (their own transfer
    syntaxes, JPEG 2000 included); the broken JPEG 2000 file is stored and then listed as
    undecodable, with the decoder's reason."""
    good = dicom_dir / "chest" / "pydicomdata__RG1_J2KR.dcm"
    broken = dicom_dir / "chest" / BROKEN_DICOM
    done = storescu(app.port, [good, broken], options=["-xv"])  # both JPEG 2000 lossless
    assert done.returncode == 0, done.stderr
    for path, expected in ((good, "scored"), (broken, "undecodable")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        body = app.wait_study(
            header.StudyInstanceUID,
            lambda b: statuses(b).get(header.SOPInstanceUID) != "received",  # noqa: B023
            what=f"{path.name} triaged",
        )
        assert statuses(body) == {header.SOPInstanceUID: expected}
        if expected == "undecodable":
            assert body["instances"][0]["reason"]
            assert body["findings"] == []


# ------------------------------------------------------------------------------ STOW-RS


def _stow(app: PacsApp, parts: list[bytes], path: str = "/dicomweb/studies", **kwargs):  # type: ignore[no-untyped-def]
    body, content_type = stow_body(parts, **kwargs)
    return app.client.post(
        path, content=body, headers={**AUTH, "Content-Type": content_type, "Accept": DICOM_JSON}
    )


def test_stow_all_stored_is_200_with_referenced_sops(app: PacsApp, pngs: list[Path]) -> None:
    pa, lateral = make_study(pngs[5:7], views=("PA", "LL"))
    response = _stow(app, [to_bytes(pa), to_bytes(lateral)])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(DICOM_JSON)
    body = response.json()
    assert sorted(sop_uids_in(body["00081199"])) == sorted(
        [pa.SOPInstanceUID, lateral.SOPInstanceUID]
    )
    assert "00081198" not in body
    classes = {item["00081150"]["Value"][0] for item in body["00081199"]["Value"]}
    assert classes == {str(pa.SOPClassUID)}
    study = app.wait_study(pa.StudyInstanceUID, settled(), what="the STOW study scored")
    assert statuses(study) == {pa.SOPInstanceUID: "scored", lateral.SOPInstanceUID: "ineligible"}


def test_stow_partial_failure_is_202_with_failure_reasons(app: PacsApp, pngs: list[Path]) -> None:
    good = make_dataset(pngs[7])
    mismatched = make_dataset(pngs[7])
    response = _stow(app, [to_bytes(good), b"not dicom at all", to_bytes(mismatched)])
    assert response.status_code == 202, response.text
    body = response.json()
    assert sop_uids_in(body["00081199"]) == [good.SOPInstanceUID, mismatched.SOPInstanceUID]
    failed = body["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [0xC000]


def test_stow_nothing_stored_is_409(app: PacsApp, pngs: list[Path]) -> None:
    response = _stow(app, [b"garbage", b"\x00" * 200])
    assert response.status_code == 409
    reasons = [i["00081197"]["Value"][0] for i in response.json()["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]


def test_stow_to_a_study_url_refuses_other_studies(app: PacsApp, pngs: list[Path]) -> None:
    ours, theirs = make_dataset(pngs[8]), make_dataset(pngs[9])
    response = _stow(
        app, [to_bytes(ours), to_bytes(theirs)], path=f"/dicomweb/studies/{ours.StudyInstanceUID}"
    )
    assert response.status_code == 202
    body = response.json()
    assert sop_uids_in(body["00081199"]) == [ours.SOPInstanceUID]
    assert sop_uids_in(body["00081198"]) == [theirs.SOPInstanceUID]
    assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert app.study(theirs.StudyInstanceUID) is None


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/dicom", 415),
        ('multipart/related; type="application/dicom+json"; boundary=x', 415),
        ('multipart/related; type="application/dicom"', 400),
        ('multipart/related; type="application/dicom"; boundary=' + "b" * 300, 400),
        ("multipart/form-data; boundary=x", 415),
    ],
)
def test_stow_wrong_request_is_a_problem(app: PacsApp, content_type: str, status: int) -> None:
    response = app.client.post(
        "/dicomweb/studies", content=b"--x--\r\n", headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == status


def test_stow_malformed_or_empty_body_is_400(app: PacsApp) -> None:
    headers = {**AUTH, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    for content in (b"", b"--b\r\nContent-Type: application/dicom\r\n\r\nabc"):
        response = app.client.post("/dicomweb/studies", content=content, headers=headers)
        assert response.status_code == 400, content
        assert response.headers["content-type"].startswith("application/problem+json")


def test_stow_needs_the_api_key_and_keeps_the_upload_limit(app: PacsApp, pngs: list[Path]) -> None:
    body, content_type = stow_body([to_bytes(make_dataset(pngs[10]))])
    response = app.client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    big, content_type = stow_body([b"\x00" * (9 * 1024 * 1024)])
    response = app.client.post(
        "/dicomweb/studies", content=big, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == 413
    assert app.client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------ audit


def test_every_received_instance_is_audited_without_patient_fields(
    app: PacsApp, pngs: list[Path]
) -> None:
    dimse = make_dataset(pngs[11])
    web = make_dataset(pngs[11])
    assert c_store(app.port, [dimse]) == [0x0000]
    assert _stow(app, [to_bytes(web)]).status_code == 200
    app.client.app.state.audit.flush()  # type: ignore[attr-defined]
    conn = sqlite3.connect(app.settings.audit_db)
    try:
        rows = conn.execute(
            "SELECT source, outcome, status, study_instance_uid, sop_instance_uid, request_id "
            "FROM predictions WHERE sop_instance_uid IN (?, ?)",
            (dimse.SOPInstanceUID, web.SOPInstanceUID),
        ).fetchall()
        dump = json.dumps(conn.execute("SELECT * FROM predictions").fetchall())
    finally:
        conn.close()
    by_sop = {row[4]: row for row in rows}
    assert by_sop[dimse.SOPInstanceUID][:4] == ("c-store", "stored", 200, dimse.StudyInstanceUID)
    assert by_sop[web.SOPInstanceUID][:4] == ("stow-rs", "stored", 200, web.StudyInstanceUID)
    assert by_sop[dimse.SOPInstanceUID][5].startswith("dimse-")
    for value in PATIENT_VALUES:
        assert value not in dump


# ------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    return cert, key


def test_dicom_tls(tmp_path: Path, tls_files: tuple[Path, Path], pngs: list[Path]) -> None:
    cert, key = tls_files
    settings = pacs_settings(tmp_path, dicom_tls_cert=cert, dicom_tls_key=key)
    with running_app(settings) as tls_app:
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        ae.add_requested_context(make_dataset(pngs[0]).SOPClassUID)
        assoc = ae.associate(
            "127.0.0.1", tls_app.port, ae_title=AE_TITLE, tls_args=(client_ctx, "localhost")
        )
        assert assoc.is_established
        ds = make_dataset(pngs[12])
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        assoc.release()
        assert tls_app.study(ds.StudyInstanceUID) is not None
        # A plain association to the TLS port gets nowhere.
        assert c_echo(tls_app.port) is None


def test_dicom_mutual_tls(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """With CXR_DICOM_TLS_CA, an SCU needs a certificate that CA signed (the self-signed test
    certificate is its own CA, so it serves as the client's certificate too)."""
    cert, key = tls_files
    settings = pacs_settings(tmp_path, dicom_tls_cert=cert, dicom_tls_key=key, dicom_tls_ca=cert)
    with running_app(settings) as tls_app:

        def echo(with_certificate: bool) -> bool:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
            if with_certificate:
                context.load_cert_chain(str(cert), str(key))
            ae = AE(ae_title="TESTSCU")
            ae.acse_timeout = ae.network_timeout = 10
            ae.add_requested_context(Verification)
            assoc = ae.associate(
                "127.0.0.1", tls_app.port, ae_title=AE_TITLE, tls_args=(context, "localhost")
            )
            if not assoc.is_established:
                return False
            ok = int(assoc.send_c_echo().Status) == 0x0000
            assoc.release()
            return ok

        assert echo(with_certificate=True)
        assert not echo(with_certificate=False)


def test_bad_dataset_value_never_reaches_the_log(
    app: PacsApp, pngs: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_dataset(pngs[13])
    ds.SOPInstanceUID = generate_uid()
    weird = Dataset()
    weird.update(ds)
    weird.file_meta = ds.file_meta
    weird.ViewPosition = "FAKE^PATIENT^TESTONLY"  # a patient value where a code belongs
    with caplog.at_level("DEBUG"):
        assert c_store(app.port, [weird]) == [0x0000]
        app.wait_study(ds.StudyInstanceUID, settled(), what="the study scored")
    for value in PATIENT_VALUES:
        assert value not in caplog.text


def test_serve_refuses_several_workers_with_the_pacs_side_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One DICOM port, one study database, one outbox: two worker processes would race."""
    from app.cli import main

    monkeypatch.setenv("CXR_PACS_ENABLED", "true")
    assert main(["serve", "--workers", "2", "--port", "0"]) == 2
    assert "--workers 1" in capsys.readouterr().err
