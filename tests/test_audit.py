"""The audit trail: rows for every prediction request, written off the event loop, readable."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from app.api.problems import Problem
from app.ops.audit import (
    COLUMNS,
    AuditEntry,
    AuditLog,
    AuditMiddleware,
    entry_for,
    main,
    parse_when,
)
from app.ops.logs import RequestIdMiddleware


def rows(db: Path, where: str = "") -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM predictions {where} ORDER BY id").fetchall()
    finally:
        conn.close()


def entry(n: int, **fields: object) -> AuditEntry:
    made = AuditEntry(request_id=f"req-{n}", status=200, outcome="ok")
    made.note_image("dicom", _Uids(f"1.2.3.{n}"))
    made.note_model("vit-b16-nih", "1.0.0")
    made.note_findings(["Effusion", "Atelectasis"], ["Effusion"], True)
    for name, value in fields.items():
        setattr(made, name, value)
    return made


class _Uids:
    def __init__(self, sop: str) -> None:
        self.study_instance_uid = "1.2.study"
        self.series_instance_uid = "1.2.series"
        self.sop_instance_uid = sop


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "var" / "audit.sqlite")
    log.start()
    yield log
    log.close()


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite", batch_size=64)
    log.start()
    for n in range(2000):
        log.record(entry(n))
    log.close()
    written = rows(tmp_path / "audit.sqlite")
    assert len(written) == 2000 and log.dropped == 0
    assert [row["request_id"] for row in written[:3]] == ["req-0", "req-1", "req-2"]
    first = written[0]
    assert first["sop_instance_uid"] == "1.2.3.0"
    assert json.loads(first["screening_positive"]) == ["Effusion", "Atelectasis"]
    assert json.loads(first["diagnosis_positive"]) == ["Effusion"]
    assert first["abnormal"] == 1 and first["model_version"] == "1.0.0"


def test_record_never_waits_for_the_database(tmp_path: Path) -> None:
    """With the writer stuck on a locked database, ``record()`` still returns at once: all 500
    calls finish while the lock is held and nothing can have been written. A ``record()`` that
    touched the database would wait on the lock and then fail, not return."""
    db = tmp_path / "audit.sqlite"
    log = AuditLog(db)
    log.start()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer's next insert has to wait for this lock
    try:
        log.record(entry(0))
        deadline = time.monotonic() + 60
        while not log._queue.empty():  # the writer has taken entry 0: it now waits on the lock
            assert time.monotonic() < deadline, "the writer never picked up the first entry"
            time.sleep(0.005)
        for n in range(1, 500):
            log.record(entry(n))
        assert (log.written, log.dropped) == (0, 0)
        assert blocker.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    log.close()
    assert len(rows(db)) == 500


def test_flush_makes_rows_visible_while_running(audit: AuditLog) -> None:
    audit.record(entry(1))
    assert audit.flush()
    assert audit.path is not None and len(rows(audit.path)) == 1


def test_database_is_private_and_in_wal_mode(audit: AuditLog) -> None:
    assert audit.path is not None
    assert stat.S_IMODE(audit.path.stat().st_mode) == 0o600
    conn = sqlite3.connect(audit.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_schema_holds_no_pixels_and_no_patient_fields() -> None:
    forbidden = ("pixel", "image", "patient", "name", "birth", "sex", "age", "accession")
    allowed_names = {"model_name"}
    for column in COLUMNS:
        if column in allowed_names:
            continue
        assert not any(word in column for word in forbidden), column


def test_disabled_audit_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog(None)
    log.start()
    log.record(entry(1))
    log.close()
    assert not log.enabled and list(tmp_path.iterdir()) == []


def test_record_after_close_is_counted_not_lost_silently(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite")
    log.start()
    log.close()
    log.record(entry(1))
    assert log.dropped == 1


def test_concurrent_writers_from_threads(audit: AuditLog) -> None:
    def burst(offset: int) -> None:
        for n in range(250):
            audit.record(entry(offset + n))

    threads = [threading.Thread(target=burst, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()
    assert audit.path is not None
    assert len({row["request_id"] for row in rows(audit.path)}) == 1000


# ------------------------------------------------------------------------------ middleware


def make_app(log: AuditLog) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(Problem, lambda request, exc: exc.to_response())  # type: ignore[arg-type, return-value]

    @app.post("/predict")
    async def predict(request: Request, fail: int = 0) -> dict[str, str]:
        audit_entry = entry_for(request)
        assert audit_entry is not None
        audit_entry.note_image("dicom", _Uids("1.2.9"))
        if fail == 422:
            raise Problem(422, "no pixel data", slug="no-pixel-data")
        if fail == 500:
            raise RuntimeError("bug")
        audit_entry.note_model("m", "2")
        audit_entry.note_findings(["Mass"], [], True)
        return {"request_id": request.state.request_id}

    @app.post("/other")
    def other() -> dict[str, str]:
        return {}

    app.add_middleware(AuditMiddleware, audit=log)
    app.add_middleware(RequestIdMiddleware)
    return app


def test_middleware_records_success_and_failures(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    log = AuditLog(db)
    log.start()
    with TestClient(make_app(log), raise_server_exceptions=False) as client:
        ok = client.post("/predict", headers={"X-Request-ID": "ok-1"})
        bad = client.post("/predict", params={"fail": 422})
        boom = client.post("/predict", params={"fail": 500})
        client.post("/other")
    log.close()
    assert ok.json() == {"request_id": "ok-1"}
    assert (bad.status_code, boom.status_code) == (422, 500)
    got = rows(db)
    assert [row["request_id"] for row in got[:2]] == ["ok-1", bad.headers["x-request-id"]]
    assert len(got[2]["request_id"]) == 32
    assert [(row["status"], row["outcome"], row["problem"]) for row in got] == [
        (200, "ok", None),
        (422, "rejected", "no-pixel-data"),
        (500, "error", None),
    ]
    assert all(row["sop_instance_uid"] == "1.2.9" for row in got)
    assert json.loads(got[0]["screening_positive"]) == ["Mass"]
    assert got[0]["duration_ms"] > 0


# ------------------------------------------------------------------------------ reader


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    db = tmp_path / "audit.sqlite"
    log = AuditLog(db)
    log.start()
    log.record(entry(1, time="2026-01-01T08:00:00.000Z"))
    log.record(entry(2, time="2026-01-02T08:00:00.000Z", status=503, outcome="overloaded"))
    log.record(entry(3, time="2026-01-03T08:00:00.000Z"))
    log.close()
    return db


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_cli_json_since_and_filters(filled: Path) -> None:
    code, text = run_cli("--db", str(filled), "--format", "json", "--since", "2026-01-02")
    assert code == 0
    assert [row["request_id"] for row in json.loads(text)] == ["req-2", "req-3"]
    _, text = run_cli("--db", str(filled), "--format", "json", "--failed")
    assert [row["status"] for row in json.loads(text)] == [503]
    _, text = run_cli("--db", str(filled), "--format", "json", "--sop", "1.2.3.3")
    (only,) = json.loads(text)
    assert only["screening_positive"] == ["Effusion", "Atelectasis"] and only["abnormal"] is True


def test_cli_limit_keeps_most_recent_oldest_first(filled: Path) -> None:
    _, text = run_cli("--db", str(filled), "--format", "json", "--limit", "2")
    assert [row["request_id"] for row in json.loads(text)] == ["req-2", "req-3"]


def test_cli_table_and_csv(filled: Path) -> None:
    code, table = run_cli("--db", str(filled))
    lines = table.splitlines()
    assert code == 0 and lines[0].startswith("time") and len(lines) == 4
    assert "503 overloaded" in lines[2] and "Effusion,Atelectasis" in lines[1]
    _, text = run_cli("--db", str(filled), "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert tuple(parsed[0]) == COLUMNS
    assert parsed[0]["screening_positive"] == "Effusion;Atelectasis"


def test_cli_reads_database_default_from_env(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_AUDIT_DB", str(filled))
    code, text = run_cli("--format", "json")
    assert code == 0 and len(json.loads(text)) == 3


def test_cli_missing_database_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_cli("--db", str(tmp_path / "none.sqlite"))
    assert code == 1
    assert "no audit database" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()


def test_parse_when() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
    assert parse_when("24h", now=now) == "2026-03-09T12:00:00.000Z"
    assert parse_when("30m", now=now) == "2026-03-10T11:30:00.000Z"
    assert parse_when("2026-01-31") == "2026-01-31T00:00:00.000Z"
    assert parse_when("2026-01-31T10:00+02:00") == "2026-01-31T08:00:00.000Z"
    with pytest.raises(Exception, match="not a time"):
        parse_when("yesterday")


# ------------------------------------------------------------------------------ the service


def test_service_audits_real_dicoms_and_never_stores_patient_data(
    tiny_model_dir: Path, dicom_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Real DICOMs through the real app: one row each with its UIDs and findings, and not one
    patient name, id or birth date in the audit database, the logs or the responses."""
    import pydicom

    from app.main import create_app
    from app.settings import Settings

    db = tmp_path / "audit.sqlite"
    settings = Settings(
        model_dir=tiny_model_dir,
        intra_op_threads=1,
        audit_db=db,
        log_json=True,
        log_level="DEBUG",
    )
    # An uncompressed CR, the known-broken JPEG 2000 (a 4xx) and a JPEG baseline DX.
    names = ("pydicomdata__RG1_UNCR.dcm", "pylibjpegdata__966.dcm", "torchxrayvision__Fake")
    paths = [p for p in sorted((dicom_dir / "chest").glob("*.dcm")) if p.name.startswith(names)]
    secrets: set[str] = set()
    expected: dict[str, tuple[int, str | None]] = {}
    responses: list[str] = []
    with TestClient(create_app(settings)) as client:
        for path in paths:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
                value = str(header.get(keyword) or "")
                if len(value) >= 4:
                    secrets.add(value)
            response = client.post(
                "/predict", files={"file": (path.name, path.read_bytes(), "application/dicom")}
            )
            responses.append(response.text)
            sop = str(header.SOPInstanceUID) if response.status_code == 200 else None
            expected[response.headers["x-request-id"]] = (response.status_code, sop)
    assert secrets and {status for status, _ in expected.values()} >= {200}

    got = {row["request_id"]: row for row in rows(db)}
    assert set(got) == set(expected)
    for request_id, (status, sop) in expected.items():
        row = got[request_id]
        assert row["status"] == status
        if status == 200:
            assert row["sop_instance_uid"] == sop and row["source"] == "dicom"
            assert row["model_name"] == "tiny" and row["screening_positive"] is not None
        else:
            assert 400 <= status < 500 and row["problem"]

    stored = b"".join(p.read_bytes() for p in tmp_path.glob("audit.sqlite*"))
    logs = capfd.readouterr().err
    assert '"request_id"' in logs
    for secret in secrets:
        assert secret.encode() not in stored, secret
        assert secret not in logs, secret
        assert all(secret not in text for text in responses), secret
