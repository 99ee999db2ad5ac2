"""Study assembly and triage through the real app: eligibility, the per-finding maximum (checked
against POST /predict of the same images), priority rules, late instances, duplicates, our own
results coming back, restarts, and GET /v1/studies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.uid import RLELossless

from app.api.schemas import Finding
from app.labels import NO_FINDING
from app.pacs.model import Priority, parse_priority_rules
from app.pacs.service import priority_rules
from app.pacs.triage import study_priority
from app.settings import Settings
from tests.dicom_factory import make_dataset, make_study, nih_pngs, to_bytes
from tests.pacs_in_fixtures import (
    AUTH,
    KEY,
    PATIENT_VALUES,
    PacsApp,
    c_store,
    pacs_settings,
    running_app,
    settled,
    statuses,
    stow_body,
)
from tests.pacs_out_fixtures import FakePacs

RULES = "Pneumothorax:diagnosis=STAT,*:diagnosis=HIGH"
# The study path and POST /predict may score an image in different batches, or one on the
# all-thread session and the other on the one-thread stream session: float32 sums then run in
# another order and differ by ~1e-7 (CI saw 3e-8). Equal up to float32 rounding is what we mean.
FLOAT32_ATOL = 1e-6


@pytest.fixture(scope="module")
def pngs(data_dir: Path) -> list[Path]:
    return nih_pngs(data_dir)


@pytest.fixture(scope="module")
def fake_pacs() -> Iterator[FakePacs]:
    pacs = FakePacs().start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_pacs: FakePacs) -> Iterator[PacsApp]:
    folder = tmp_path_factory.mktemp("studies")
    settings = pacs_settings(folder, destinations=fake_pacs.url, api_keys=KEY, priority_rules=RULES)
    with running_app(settings) as running:
        yield running


def predicted(app: PacsApp, ds: Any) -> list[dict[str, Any]]:
    """POST /predict findings of one instance: the single-image path the study must agree with."""
    response = app.client.post(
        "/predict", content=to_bytes(ds), headers={**AUTH, "Content-Type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    return response.json()["findings"]


def delivered(n: int) -> Any:
    """Until: the study is delivered with ``n`` result objects, all delivered."""
    return lambda body: (
        body["state"] == "delivered"
        and len(body["results"]) == n
        and all(r["delivery"] == "delivered" for r in body["results"])
    )


def received_for(pacs: FakePacs, study_uid: str) -> dict[str, list[Any]]:
    with pacs._lock:
        return {
            sop: copies
            for sop, copies in pacs.received.items()
            if str(copies[0].StudyInstanceUID) == study_uid
        }


def expected_priority(findings: list[dict[str, Any]]) -> str:
    """RULES, written out independently of the implementation."""
    positive = {f["label"] for f in findings if f["diagnosis_positive"]} - {NO_FINDING}
    if "Pneumothorax" in positive:
        return "STAT"
    return "HIGH" if positive else "ROUTINE"


# ------------------------------------------------------------------------------ triage


def test_pa_and_lateral(app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]) -> None:
    pa, lateral = make_study(pngs[0:2], views=("PA", "LL"))
    assert c_store(app.port, [pa, lateral]) == [0, 0]
    body = app.wait_study(pa.StudyInstanceUID, delivered(2), what="SR + SC delivered")
    assert statuses(body) == {pa.SOPInstanceUID: "scored", lateral.SOPInstanceUID: "ineligible"}
    single = predicted(app, pa)
    assert [f["label"] for f in body["findings"]] == [f["label"] for f in single]
    for got, want in zip(body["findings"], single, strict=True):
        assert got["probability"] == pytest.approx(want["probability"], abs=FLOAT32_ATOL)
        assert got["screening_positive"] is want["screening_positive"]
        assert got["diagnosis_positive"] is want["diagnosis_positive"]
    assert body["priority"] == expected_priority(single)
    card = app.client.app.state.runtime.card  # type: ignore[attr-defined]
    assert body["model"] == {"name": card.name, "version": card.version}
    assert sorted(r["kind"] for r in body["results"]) == ["sc", "sr"]
    assert {r["destination"] for r in body["results"]} == {fake_pacs.url}
    sent = received_for(fake_pacs, pa.StudyInstanceUID)
    assert sorted(sent) == sorted(r["sop_instance_uid"] for r in body["results"])
    assert all(len(copies) == 1 for copies in sent.values())
    text = app.client.get(f"/v1/studies/{pa.StudyInstanceUID}", headers=AUTH).text
    for value in PATIENT_VALUES:
        assert value not in text


def test_study_finding_is_the_maximum_over_frontal_images(app: PacsApp, pngs: list[Path]) -> None:
    pa, ap = make_study(pngs[2:4], views=("PA", "AP"))
    assert c_store(app.port, [pa, ap]) == [0, 0]
    body = app.wait_study(pa.StudyInstanceUID, delivered(2), what="the study delivered")
    assert statuses(body) == {pa.SOPInstanceUID: "scored", ap.SOPInstanceUID: "scored"}
    per_image = np.array(
        [[f["probability"] for f in predicted(app, ds)] for ds in (pa, ap)], dtype=np.float64
    )
    assert not np.allclose(per_image[0], per_image[1])  # two different radiographs
    np.testing.assert_allclose(
        [f["probability"] for f in body["findings"]],
        per_image.max(axis=0),
        atol=FLOAT32_ATOL,
        rtol=0,
    )


def test_priority_rules_only_raise(app: PacsApp, pngs: list[Path]) -> None:
    labels = app.client.app.state.runtime.card.labels  # type: ignore[attr-defined]
    findings = [Finding(**f) for f in predicted(app, make_dataset(pngs[4]))]
    flagged = [f.label for f in findings if f.screening_positive and f.label != NO_FINDING]
    clear = [f.label for f in findings if not f.screening_positive and f.label != NO_FINDING]
    assert flagged and clear, "the image should have both flagged and clear findings"

    def priority(text: str) -> Priority:
        return study_priority(findings, parse_priority_rules(text, labels))

    assert priority("") is Priority.ROUTINE
    assert priority(f"{flagged[0]}:screening=STAT") is Priority.STAT
    assert priority(f"{clear[0]}:screening=STAT") is Priority.ROUTINE
    assert priority(f"{flagged[0]}:screening=STAT,*:screening=HIGH") is Priority.STAT
    assert priority(f"*:screening=HIGH,{flagged[0].lower()}:screening=stat") is Priority.STAT
    assert priority(f"{clear[0]}:diagnosis=STAT,*:screening=HIGH") is Priority.HIGH
    for bad in ("Effusion:diagnosis=ROUTINE", "Effusion:diagnosis=LOW", "Effusion=STAT"):
        with pytest.raises(ValidationError):
            Settings(priority_rules=bad)
    with pytest.raises(ValueError, match="not a model label"):
        parse_priority_rules("Pneumothorx:diagnosis=STAT", labels)


def test_a_rule_for_a_label_the_model_lacks_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model label"):  # noqa: SIM117
        with running_app(pacs_settings(tmp_path, priority_rules="Covid:diagnosis=STAT")):
            pass
    # The default rules name NIH labels: a model with other labels runs without those rules.
    other_labels = ["Covid", "Nodule", NO_FINDING]
    kept = priority_rules(Settings(), other_labels)
    assert [str(rule) for rule in kept] == ["*:diagnosis=HIGH"]
    with pytest.raises(ValueError, match="not a model label"):
        priority_rules(Settings(priority_rules="Pneumothorax:diagnosis=STAT"), other_labels)


# ------------------------------------------------------------------------------ late, duplicate


def test_late_frontal_image_retriages_and_supersedes(
    app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]
) -> None:
    pa, ap = make_study(pngs[5:7], views=("PA", "AP"))
    assert c_store(app.port, [pa]) == [0]
    first = app.wait_study(pa.StudyInstanceUID, delivered(2), what="revision 1 delivered")
    assert c_store(app.port, [ap]) == [0]
    second = app.wait_study(pa.StudyInstanceUID, delivered(4), what="revision 2 delivered")
    assert statuses(second) == {pa.SOPInstanceUID: "scored", ap.SOPInstanceUID: "scored"}
    per_image = np.array([[f["probability"] for f in predicted(app, ds)] for ds in (pa, ap)])
    np.testing.assert_allclose(
        [f["probability"] for f in second["findings"]],
        per_image.max(axis=0),
        atol=FLOAT32_ATOL,
        rtol=0,
    )
    old = {r["sop_instance_uid"] for r in first["results"]}
    new = [r for r in second["results"] if r["sop_instance_uid"] not in old]
    assert sorted(r["kind"] for r in new) == ["sc", "sr"]
    sent = received_for(fake_pacs, pa.StudyInstanceUID)
    assert len(sent) == 4
    old_sr = next(r["sop_instance_uid"] for r in first["results"] if r["kind"] == "sr")
    new_sr = sent[next(r["sop_instance_uid"] for r in new if r["kind"] == "sr")][0]
    predecessors = [
        sop.ReferencedSOPInstanceUID
        for item in new_sr.PredecessorDocumentsSequence
        for series in item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert old_sr in predecessors


def test_late_lateral_is_listed_but_sends_nothing_new(
    app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]
) -> None:
    pa, lateral = make_study(pngs[7:9], views=("PA", "LL"))
    assert c_store(app.port, [pa]) == [0]
    app.wait_study(pa.StudyInstanceUID, delivered(2), what="PA delivered")
    assert c_store(app.port, [lateral]) == [0]
    body = app.wait_study(
        pa.StudyInstanceUID,
        lambda b: statuses(b).get(lateral.SOPInstanceUID) == "ineligible" and delivered(2)(b),
        what="the lateral listed",
    )
    assert len(body["results"]) == 2
    assert len(received_for(fake_pacs, pa.StudyInstanceUID)) == 2


def test_a_resent_image_is_a_duplicate(app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]) -> None:
    pa = make_dataset(pngs[9])
    assert c_store(app.port, [pa]) == [0]
    app.wait_study(pa.StudyInstanceUID, delivered(2), what="PA delivered")
    before = app.metric("cxr_pacs_instances_received_total", source="c-store", outcome="duplicate")
    assert c_store(app.port, [pa]) == [0]  # "we have it"
    # The receipt decides synchronously: a re-opened study would say "receiving" right now.
    body = app.study(pa.StudyInstanceUID)
    assert body is not None and body["state"] == "delivered"
    assert [(i["sop_instance_uid"], i["status"]) for i in body["instances"]] == [
        (pa.SOPInstanceUID, "scored"),
        (pa.SOPInstanceUID, "duplicate"),
    ]
    assert "same pixels" in body["instances"][1]["reason"]
    after = app.metric("cxr_pacs_instances_received_total", source="c-store", outcome="duplicate")
    assert after == before + 1
    assert len(body["results"]) == 2
    assert len(received_for(fake_pacs, pa.StudyInstanceUID)) == 2


def test_the_same_image_in_another_lossless_syntax_sends_nothing_new(
    app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]
) -> None:
    """Resent transcoded (a router's choice), the encoded pixels differ but the image does not:
    the study is looked at again, and its result stands."""
    pa = make_dataset(pngs[15])
    assert c_store(app.port, [pa]) == [0]
    app.wait_study(pa.StudyInstanceUID, delivered(2), what="revision 1")
    body, content_type = stow_body([to_bytes(pa, RLELossless)])
    response = app.client.post(
        "/dicomweb/studies", content=body, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    assert app.study(pa.StudyInstanceUID)["state"] == "receiving"  # type: ignore[index]
    again = app.wait_study(pa.StudyInstanceUID, delivered(2), what="looked at again")
    assert statuses(again) == {pa.SOPInstanceUID: "scored"}
    assert len(received_for(fake_pacs, pa.StudyInstanceUID)) == 2


def test_same_instance_with_new_pixels_is_triaged_again(app: PacsApp, pngs: list[Path]) -> None:
    first = make_dataset(pngs[10])
    corrected = make_dataset(
        pngs[11], study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
        sop_uid=first.SOPInstanceUID,
    )  # fmt: skip
    assert c_store(app.port, [first]) == [0]
    app.wait_study(first.StudyInstanceUID, delivered(2), what="revision 1")
    assert c_store(app.port, [corrected]) == [0]
    body = app.wait_study(first.StudyInstanceUID, delivered(4), what="revision 2")
    assert statuses(body) == {first.SOPInstanceUID: "scored"}
    want = [f["probability"] for f in predicted(app, corrected)]
    np.testing.assert_allclose(
        [f["probability"] for f in body["findings"]], want, atol=FLOAT32_ATOL, rtol=0
    )


def test_our_own_results_coming_back_are_ignored(
    app: PacsApp, fake_pacs: FakePacs, pngs: list[Path]
) -> None:
    """A PACS that routes whole studies sends our SR and SC back: no loop, no new result."""
    pa = make_dataset(pngs[12])
    assert c_store(app.port, [pa]) == [0]
    body = app.wait_study(pa.StudyInstanceUID, delivered(2), what="PA delivered")
    ours = [copies[0] for copies in received_for(fake_pacs, pa.StudyInstanceUID).values()]
    assert c_store(app.port, [pa, *ours]) == [0, 0, 0]
    again = app.study(pa.StudyInstanceUID)
    assert again is not None and again["state"] == "delivered"
    assert {i["sop_instance_uid"] for i in again["instances"]} == {pa.SOPInstanceUID}
    assert again["results"] == body["results"]
    assert (
        app.metric("cxr_pacs_instances_received_total", source="c-store", outcome="own-result") >= 2
    )


# ------------------------------------------------------------------------------ GET, restart


def test_unknown_study_is_404_and_the_route_needs_the_key(app: PacsApp) -> None:
    response = app.client.get("/v1/studies/1.2.3.4.5.6.7", headers=AUTH)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404
    assert app.client.get("/v1/studies/1.2.3.4.5.6.7").status_code == 401


def test_stored_but_unscored_instances_are_scored_after_a_restart(
    tmp_path: Path, fake_pacs: FakePacs, pngs: list[Path]
) -> None:
    pa, lateral = make_study(pngs[13:15], views=("PA", "LL"))
    # A stable window longer than the first run: nothing can be scored before it stops.
    first = pacs_settings(tmp_path, destinations=fake_pacs.url, study_stable_s=3600.0)
    with running_app(first) as running:
        assert c_store(running.port, [pa, lateral]) == [0, 0]
        body = running.study(pa.StudyInstanceUID)
        assert body is not None and body["state"] == "receiving"
        assert set(statuses(body).values()) == {"received"}
    second = first.model_copy(update={"study_stable_s": 0.2, "dicom_port": first.dicom_port})
    with running_app(second) as running:
        body = running.wait_study(pa.StudyInstanceUID, delivered(2), what="scored after restart")
        assert statuses(body) == {
            pa.SOPInstanceUID: "scored",
            lateral.SOPInstanceUID: "ineligible",
        }
    assert len(received_for(fake_pacs, pa.StudyInstanceUID)) == 2


def test_a_failed_study_is_shown_and_retried_by_the_operator_command(
    tmp_path: Path,
    fake_pacs: FakePacs,
    pngs: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stored file lost before scoring (a disk cleanup) makes the study fail, visibly; once
    the file is back, ``python -m app.pacs.studies retry-failed`` has it scored and delivered."""
    import json

    from app.pacs.studies import main as studies_main

    pa = make_dataset(pngs[16])
    first = pacs_settings(tmp_path, destinations=fake_pacs.url, study_stable_s=3600.0)
    with running_app(first) as running:
        assert c_store(running.port, [pa]) == [0]
    stored = next((tmp_path / "pacs" / "instances").rglob(f"{pa.SOPInstanceUID}.dcm"))
    kept = stored.read_bytes()
    stored.unlink()
    second = first.model_copy(update={"study_stable_s": 0.2})
    with running_app(second) as running:
        body = running.wait_study(pa.StudyInstanceUID, settled(("failed",)), what="failed")
        assert statuses(body) == {pa.SOPInstanceUID: "undecodable"}
    db = str(first.studies_db)
    assert studies_main(["--db", db, "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["studies"].get("failed") == 1
    assert [f["study_instance_uid"] for f in status["failed"]] == [pa.StudyInstanceUID]
    stored.write_bytes(kept)
    assert studies_main(["--db", db, "retry-failed", "--study", pa.StudyInstanceUID]) == 0
    assert "re-queued 1" in capsys.readouterr().out
    assert studies_main(["--db", db, "status"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == []
    with running_app(second) as running:
        body = running.wait_study(pa.StudyInstanceUID, delivered(2), what="delivered after retry")
        assert statuses(body) == {pa.SOPInstanceUID: "scored"}
