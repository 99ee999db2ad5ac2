"""The outbox and its DIMSE sender against real storage SCPs: an in-process pynetdicom fake
PACS, DCMTK's ``storescp`` (``--unique-filenames``, so a second copy of an object would show
as a second file) and a pynetdicom SCP in a separate process that is killed mid-delivery.

Every wait polls a condition with a generous deadline; backoff delays are checked from the
schedule the outbox persisted, never by timing the test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from app.card import ModelCard
from app.ops.audit import AuditLog, query
from app.pacs.model import ResultObject, parse_destination
from app.pacs.outbox import Outbox
from app.pacs.results import write_results
from app.pacs.send import DimseSender, stow_outcome
from app.settings import DEFAULT_MODEL_DIR
from tests.dicom_factory import (
    FAKE_ACCESSION,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    make_study,
    nih_pngs,
)
from tests.pacs_out_fixtures import (
    FakePacs,
    StoreScp,
    default_runtime,
    dimse_echo,
    free_port,
    score_study,
    store_study,
)

PATIENT_VALUES = (FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_ACCESSION, "FAKE HOSPITAL")

needs_storescp = pytest.mark.skipif(
    shutil.which("storescp") is None, reason="DCMTK storescp not installed (apt-get install dcmtk)"
)


@pytest.fixture(scope="module")
def studies(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[str, list[ResultObject]]]:
    """Two studies' real result objects (SR + SC each), written by the result writer."""
    pngs = nih_pngs(data_dir)
    if len(pngs) < 2:
        pytest.skip("fewer than 2 shared 1024 px NIH images")
    runtime = default_runtime()
    root = tmp_path_factory.mktemp("outbox-results")
    found = []
    for n, png in enumerate(pngs[:2]):
        paths = store_study(make_study([png], views=("PA",)), root / f"in{n}")
        result = score_study(paths, runtime)
        objects = write_results(result, runtime.card, root / "out")
        assert [o.kind for o in objects] == ["sr", "sc"]
        found.append((result.study_instance_uid, objects))
    return found


async def until(condition: Callable[[], Any], *, timeout: float = 60.0, what: str = "") -> Any:
    """Poll on the event loop (the outbox runs on it) until ``condition()`` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


def states(outbox: Outbox, study_uid: str) -> list[str]:
    return [d["delivery"] for d in outbox.deliveries(study_uid)]


def all_delivered(outbox: Outbox, study_uids: Sequence[str]) -> bool:
    rows = [s for uid in study_uids for s in states(outbox, uid)]
    return bool(rows) and all(s == "delivered" for s in rows)


def metric(registry: CollectorRegistry, name: str, destination: str) -> float:
    value = registry.get_sample_value(name, {"destination": destination})
    assert value is not None, f"{name} for {destination} not exposed"
    return value


def schedule(db: Path) -> list[tuple[int, float, float]]:
    """(attempts, last attempt, next attempt) of every row, read by a second connection."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT attempts, last_attempt_at, next_attempt_at FROM outbox "
            "WHERE last_attempt_at IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()


@needs_storescp
def test_delivers_every_object_once_to_each_destination_with_audit_and_metrics(
    studies: list[tuple[str, list[ResultObject]]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    study_uid, objects = studies[0]
    fake = FakePacs().start()
    scp = StoreScp(tmp_path / "storescp", free_port()).start()
    audit = AuditLog(tmp_path / "audit.sqlite")
    audit.start()
    registry = CollectorRegistry()
    destinations = [parse_destination(fake.url), parse_destination(scp.url)]
    db = tmp_path / "outbox.sqlite"

    async def scenario() -> None:
        outbox = Outbox(
            db, destinations, calling_ae_title="CXR_TRIAGE", audit=audit, registry=registry
        )
        await outbox.start()
        try:
            assert outbox.enqueue(study_uid, objects) == 4
            assert outbox.enqueue(study_uid, objects) == 0  # the same objects again: nothing new
            await until(lambda: all_delivered(outbox, [study_uid]), what="delivery")
            rows = outbox.deliveries(study_uid)
            assert sorted((r["sop_instance_uid"], r["destination"]) for r in rows) == sorted(
                (o.sop_instance_uid, d.label) for o in objects for d in destinations
            )
            assert all(r["attempts"] == 1 for r in rows)
            assert {r["kind"] for r in rows} == {"sr", "sc"}
            for d in destinations:
                assert metric(registry, "cxr_outbox_depth", d.label) == 0
                assert metric(registry, "cxr_outbox_delivered_total", d.label) == 2
                assert metric(registry, "cxr_outbox_delivery_failures_total", d.label) == 0
            assert outbox.enqueue(study_uid, objects) == 0  # delivered objects are not re-queued
        finally:
            await outbox.stop()

    try:
        with caplog.at_level(logging.DEBUG):
            asyncio.run(scenario())
        logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert "result delivered" in logged
        assert not [value for value in PATIENT_VALUES if value in logged]
        # The fake PACS got each object once, from our AE title, byte-for-byte the same content.
        assert sorted(fake.received) == sorted(o.sop_instance_uid for o in objects)
        assert all(len(copies) == 1 for copies in fake.received.values())
        assert set(fake.calling_aes) == {"CXR_TRIAGE"}
        for obj in objects:
            sent, got = dcmread(obj.path), fake.received[obj.sop_instance_uid][0]
            assert got.SOPClassUID == sent.SOPClassUID and got.PatientName == sent.PatientName
            if obj.kind == "sc":
                assert got.PixelData == sent.PixelData
        # storescp wrote exactly one file per object.
        assert sorted(scp.sop_uids()) == sorted(o.sop_instance_uid for o in objects)
        # The audit trail has each delivery, with UIDs and the model only.
        assert audit.flush()
        rows = [r for r in query(tmp_path / "audit.sqlite", limit=100)]
        assert sorted((r["sop_instance_uid"], r["source"]) for r in rows) == sorted(
            (o.sop_instance_uid, f"deliver:{o.kind}:{d.label}")
            for o in objects
            for d in destinations
        )
        assert {r["outcome"] for r in rows} == {"delivered"}
        card = ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")
        assert {(r["model_name"], r["model_version"]) for r in rows} == {(card.name, card.version)}
    finally:
        audit.close()
        fake.stop()
        scp.stop()
    for path in (tmp_path / "audit.sqlite", db):
        text = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        for value in PATIENT_VALUES:
            assert value.encode() not in text, f"{value} in {path.name}"


def test_retries_with_capped_backoff_while_the_destination_is_down(
    studies: list[tuple[str, list[ResultObject]]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    study_uid, objects = studies[0]
    port = free_port()  # nothing listens here until the fake PACS starts below
    destination = parse_destination(f"dimse://FAKEPACS@127.0.0.1:{port}")
    db = tmp_path / "outbox.sqlite"
    registry = CollectorRegistry()
    seen: set[tuple[int, float]] = set()
    fake = FakePacs(port=port)

    def observe() -> bool:
        """Sample the persisted schedule; done once every row has failed six times."""
        rows = schedule(db)
        for attempts, last, next_at in rows:
            seen.add((attempts, round(next_at - last, 6)))
        return len(rows) == len(objects) and min(a for a, _, _ in rows) >= 6

    async def scenario() -> None:
        outbox = Outbox(db, [destination], registry=registry, base_delay_s=0.05, max_delay_s=0.2)
        await outbox.start()
        try:
            outbox.enqueue(study_uid, objects)
            await until(observe, what="six failed attempts")
            assert set(states(outbox, study_uid)) == {"pending"}
            assert metric(registry, "cxr_outbox_depth", destination.label) == 2
            assert metric(registry, "cxr_outbox_delivery_failures_total", destination.label) >= 12
            assert metric(registry, "cxr_outbox_oldest_pending_seconds", destination.label) > 0
            fake.start()  # the PACS comes back on its address
            await until(lambda: all_delivered(outbox, [study_uid]), what="delivery after outage")
            assert metric(registry, "cxr_outbox_depth", destination.label) == 0
        finally:
            await outbox.stop()

    try:
        with caplog.at_level(logging.WARNING, logger="app.pacs.outbox"):
            asyncio.run(scenario())
    finally:
        fake.stop()

    def backoff(attempts: int) -> float:
        return round(min(0.2, 0.05 * 2 ** (attempts - 1)), 6)

    # Every failed attempt of every object, in order: 0.05, 0.1, 0.2, 0.2, ... s to the next.
    for obj in objects:
        retries = [
            (r.attempts, r.retry_in_s)
            for r in caplog.records
            if r.getMessage() == "delivery failed; will retry"
            and r.sop_instance_uid == obj.sop_instance_uid
        ]
        assert [a for a, _ in retries] == list(range(1, len(retries) + 1))
        assert len(retries) >= 6
        assert [delay for _, delay in retries] == [backoff(a) for a, _ in retries]
    # What was persisted (sampled while it ran) is that same schedule.
    assert seen and all(delay == backoff(a) for a, delay in seen), sorted(seen)
    assert all(len(copies) == 1 for copies in fake.received.values())
    assert sorted(fake.received) == sorted(o.sop_instance_uid for o in objects)


def test_an_object_the_destination_refuses_is_failed_not_retried(
    studies: list[tuple[str, list[ResultObject]]], tmp_path: Path
):
    (study_a, objects_a), (study_b, objects_b) = studies
    refused = {o.sop_instance_uid for o in objects_a if o.kind == "sc"}
    fake = FakePacs(status_for=lambda ds: 0xA900 if ds.SOPInstanceUID in refused else 0)
    fake.start()
    destination = parse_destination(fake.url)
    registry = CollectorRegistry()
    audit = AuditLog(tmp_path / "audit.sqlite")
    audit.start()
    db = tmp_path / "outbox.sqlite"

    async def scenario() -> None:
        outbox = Outbox(
            db, [destination], audit=audit, registry=registry, base_delay_s=0.05, poll_s=0.1
        )
        await outbox.start()
        try:
            outbox.enqueue(study_a, objects_a)
            await until(lambda: "pending" not in states(outbox, study_a), what="study A settled")
            # Another study goes through afterwards: the refused object is not tried again.
            outbox.enqueue(study_b, objects_b)
            await until(lambda: all_delivered(outbox, [study_b]), what="study B delivered")
            by_kind = {d["kind"]: d for d in outbox.deliveries(study_a)}
            assert by_kind["sr"]["delivery"] == "delivered"
            assert by_kind["sc"]["delivery"] == "failed" and by_kind["sc"]["attempts"] == 1
            assert metric(registry, "cxr_outbox_failed", destination.label) == 1
            # Once the PACS accepts it, an operator re-queues it from a shell and it goes.
            refused.clear()
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "app.pacs.outbox", "--db", str(db), "retry-failed",
                 "--study", study_a],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0 and "re-queued 1 object" in done.stdout, done.stderr
            await until(lambda: all_delivered(outbox, [study_a]), what="re-queued object")
            assert metric(registry, "cxr_outbox_failed", destination.label) == 0
        finally:
            await outbox.stop()

    try:
        asyncio.run(scenario())
        assert audit.flush()
        (sc,) = [o.sop_instance_uid for o in objects_a if o.kind == "sc"]
        rows = query(tmp_path / "audit.sqlite", failed=True)
        assert [(r["sop_instance_uid"], r["outcome"], r["status"]) for r in rows] == [
            (sc, "failed", 502)
        ]
        assert "0xA900" in rows[0]["problem"]
    finally:
        audit.close()
        fake.stop()


HUNG_SCP = """
import sys, threading
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

port, marker = int(sys.argv[1]), Path(sys.argv[2])

def on_store(event):
    # The whole object has arrived; the answer never leaves: the test kills this process now.
    marker.write_text(event.request.AffectedSOPInstanceUID)
    threading.Event().wait()

ae = AE("FLAKYPACS")
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


@needs_storescp
def test_destination_killed_mid_delivery_then_service_restarted_delivers_exactly_once(
    studies: list[tuple[str, list[ResultObject]]], tmp_path: Path
):
    """The PACS dies holding the bytes of an object it never acknowledged; the service
    restarts; the PACS comes back (DCMTK storescp on the same address): each object arrives
    there once, and the outbox says delivered."""
    study_uid, objects = studies[0]
    port = free_port()
    marker = tmp_path / "receiving"
    script = tmp_path / "hung_scp.py"
    script.write_text(HUNG_SCP)
    hung = subprocess.Popen(
        [sys.executable, str(script), str(port), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scp = StoreScp(tmp_path / "storescp", port, ae_title="FLAKYPACS")
    destination = parse_destination(f"dimse://FLAKYPACS@127.0.0.1:{port}")
    db = tmp_path / "outbox.sqlite"

    async def scenario() -> None:
        # A DIMSE timeout past the 60 s deadline below: had the sender waited on the dropped
        # association instead of noticing the drop, the failed attempt would not be recorded.
        outbox = Outbox(db, [destination], base_delay_s=0.05, max_delay_s=0.2, timeout_s=120)
        await outbox.start()
        try:
            await until(lambda: dimse_echo(port, "FLAKYPACS"), what="the flaky PACS to listen")
            outbox.enqueue(study_uid, objects)
            await until(marker.exists, what="the PACS to be inside a C-STORE")
            os.kill(hung.pid, signal.SIGKILL)  # mid-delivery: data sent, no response
            hung.wait(30)
            await until(
                lambda: any(d["attempts"] >= 1 for d in outbox.deliveries(study_uid)),
                what="the failed attempt to be recorded",
            )
            assert set(states(outbox, study_uid)) == {"pending"}
        finally:
            await outbox.stop()  # the service goes down with the results still pending
        scp.start()  # the PACS comes back on the same address
        restarted = Outbox(db, [destination], base_delay_s=0.05, max_delay_s=0.2)
        await restarted.start()
        try:
            await until(
                lambda: all_delivered(restarted, [study_uid]), what="delivery after restart"
            )
            cut_off = [
                d
                for d in restarted.deliveries(study_uid)
                if d["sop_instance_uid"] == marker.read_text()
            ]
            assert len(cut_off) == 1 and cut_off[0]["attempts"] >= 2
        finally:
            await restarted.stop()

    try:
        asyncio.run(scenario())
        uids = scp.sop_uids()
        assert sorted(uids) == sorted(o.sop_instance_uid for o in objects)  # once each
        assert marker.read_text() in uids
    finally:
        if hung.poll() is None:
            os.kill(hung.pid, signal.SIGKILL)
            hung.wait(30)
        scp.stop()


def test_pending_rows_survive_a_restart_without_destinations_reachable(
    studies: list[tuple[str, list[ResultObject]]], tmp_path: Path
):
    """Rows are on disk: a new Outbox on the same file knows them, and resumes at once."""
    study_uid, objects = studies[1]
    port = free_port()
    destination = parse_destination(f"dimse://FAKEPACS@127.0.0.1:{port}")
    db = tmp_path / "outbox.sqlite"
    first = Outbox(db, [destination])
    assert first.enqueue(study_uid, objects) == 2  # never started: nothing was tried
    fake = FakePacs(port=port).start()

    async def scenario() -> None:
        await first.stop()  # closes its database; it never ran a delivery task
        again = Outbox(db, [destination], max_delay_s=60.0)
        assert again.enqueue(study_uid, objects) == 0
        await again.start()
        try:
            await until(lambda: all_delivered(again, [study_uid]), what="resumed delivery")
        finally:
            await again.stop()

    try:
        asyncio.run(scenario())
    finally:
        fake.stop()
    assert sorted(fake.received) == sorted(o.sop_instance_uid for o in objects)


def test_a_result_file_lost_before_sending_is_failed_and_named(
    studies: list[tuple[str, list[ResultObject]]], tmp_path: Path
):
    """A result file deleted under the outbox: never a crash, never a silent pending forever."""
    study_uid, objects = studies[1]
    lost = tmp_path / objects[0].path.name
    lost.write_bytes(objects[0].path.read_bytes())
    gone = ResultObject(objects[0].kind, objects[0].sop_instance_uid, lost)
    fake = FakePacs().start()

    async def scenario() -> list[dict[str, Any]]:
        outbox = Outbox(tmp_path / "outbox.sqlite", [parse_destination(fake.url)])
        lost.unlink()  # after the result was written, before the outbox sends it
        assert outbox.enqueue(study_uid, [gone, objects[1]]) == 2
        await outbox.start()
        try:
            await until(lambda: "pending" not in states(outbox, study_uid), what="settled")
            return outbox.deliveries(study_uid)
        finally:
            await outbox.stop()

    try:
        rows = {r["sop_instance_uid"]: r["delivery"] for r in asyncio.run(scenario())}
    finally:
        fake.stop()
    assert rows == {gone.sop_instance_uid: "failed", objects[1].sop_instance_uid: "delivered"}
    assert list(fake.received) == [objects[1].sop_instance_uid]


def test_out_of_resources_is_retried_not_failed(
    studies: list[tuple[str, list[ResultObject]]], tmp_path: Path
):
    """0xA700 (the PACS's disk is full) clears by itself: retried until it stores."""
    study_uid, objects = studies[1]
    answers = [0xA700, 0xA700]  # the first two C-STOREs, then success

    def status(ds: Any) -> int:
        return answers.pop(0) if answers else 0x0000

    fake = FakePacs(status_for=status).start()

    async def scenario() -> list[dict[str, Any]]:
        outbox = Outbox(
            tmp_path / "outbox.sqlite", [parse_destination(fake.url)], base_delay_s=0.05
        )
        await outbox.start()
        try:
            outbox.enqueue(study_uid, objects)
            await until(lambda: all_delivered(outbox, [study_uid]), what="delivery after 0xA700")
            return outbox.deliveries(study_uid)
        finally:
            await outbox.stop()

    try:
        rows = asyncio.run(scenario())
    finally:
        fake.stop()
    assert sum(r["attempts"] for r in rows) == len(objects) + 2
    assert sorted(fake.received) == sorted(o.sop_instance_uid for o in objects)


def sop_sequence(tag: str, uid: str, reason: int | None = None) -> dict[str, Any]:
    """A PS3.18 store-response sequence (DICOM JSON) with one item for ``uid``."""
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return {tag: {"vr": "SQ", "Value": [item]}}


@pytest.mark.parametrize(
    ("status", "body", "ok", "permanent"),
    [
        (200, sop_sequence("00081199", "1.2.3"), True, False),
        (200, None, True, False),  # a 200 without a body: PS3.18 says all were stored
        (202, sop_sequence("00081198", "1.2.3", 0xA900), False, True),
        (202, sop_sequence("00081198", "1.2.3", 0xA700), False, False),
        (202, sop_sequence("00081198", "9.9"), True, False),  # another instance failed
        (409, None, False, True),
        (503, None, False, False),
        (429, None, False, False),
        (400, None, False, True),
    ],
)
def test_stow_rs_answers_per_ps3_18(status: int, body: Any, ok: bool, permanent: bool):
    """PS3.18 10.5.3: 200 stored, 202 with this instance in FailedSOPSequence not stored (its
    FailureReason says whether trying again can help), 409 none stored; 5xx/429 are transient."""
    outcome = stow_outcome(status, body, "1.2.3")
    assert (outcome.ok, outcome.permanent) == (ok, permanent), outcome.detail


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A PACS-side TLS context and its self-signed certificate (for 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "pacs.pem", folder / "pacs.key"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=pacs", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip("openssl could not make a test certificate")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, cert


def test_c_store_over_dicom_tls_verifies_the_pacs(
    studies: list[tuple[str, list[ResultObject]]],
    tmp_path: Path,
    tls_pair: tuple[ssl.SSLContext, Path],
):
    """The DIMSE sender over TLS (PS3.15 B.1) to a TLS-only PACS: delivered when it trusts the
    PACS's certificate; not delivered (kept pending) in clear text or without that trust."""
    server, cert = tls_pair
    study_uid, objects = studies[1]
    fake = FakePacs(ssl_context=server).start()
    destination = parse_destination(fake.url)
    trusted = ssl.create_default_context(cafile=str(cert))

    def run(name: str, client: ssl.SSLContext | None) -> list[dict[str, Any]]:
        async def scenario() -> list[dict[str, Any]]:
            outbox = Outbox(
                tmp_path / f"{name}.sqlite",
                [destination],
                sender_factory=lambda d: DimseSender(
                    d, calling_ae_title="CXR_TRIAGE", timeout_s=10, ssl_context=client
                ),
            )
            await outbox.start()
            try:
                outbox.enqueue(study_uid, objects)
                await until(
                    lambda: all(d["attempts"] >= 1 for d in outbox.deliveries(study_uid)),
                    what=f"{name}: first attempt",
                )
                if client is trusted:
                    await until(lambda: all_delivered(outbox, [study_uid]), what="TLS delivery")
                return outbox.deliveries(study_uid)
            finally:
                await outbox.stop()

        return asyncio.run(scenario())

    try:
        assert {d["delivery"] for d in run("clear", None)} == {"pending"}
        assert {d["delivery"] for d in run("untrusted", ssl.create_default_context())} == {
            "pending"
        }
        assert not fake.received
        assert {d["delivery"] for d in run("tls", trusted)} == {"delivered"}
    finally:
        fake.stop()
    assert sorted(fake.received) == sorted(o.sop_instance_uid for o in objects)
