"""DESIGN.md's response contract, shared by the in-process and the live-server tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from app.card import ModelCard
from app.labels import NO_FINDING

TOP_LEVEL_KEYS = {
    "request_id",
    "model",
    "dicom",
    "image",
    "findings",
    "triage",
    "heatmap",
    "warnings",
    "timing_ms",
}
# DESIGN.md's Prometheus names.
DESIGN_METRICS = (
    "cxr_requests_total",
    "cxr_request_duration_seconds",
    "cxr_batch_size",
    "cxr_queue_depth",
    "cxr_inference_duration_seconds",
    "cxr_decode_duration_seconds",
    "cxr_model_info",
)
PROBLEM_KEYS = {"type", "title", "status", "detail"}
BROKEN_DICOM = "pylibjpegdata__966.dcm"


def chest_dicoms(dicom_dir: Path) -> list[Path]:
    return sorted(p for p in (dicom_dir / "chest").glob("*.dcm") if p.name != BROKEN_DICOM)


def assert_contract(body: dict, card: ModelCard, probabilities: np.ndarray) -> None:
    """DESIGN.md's response shape, the card's thresholds, and the triage rules."""
    assert set(body) == TOP_LEVEL_KEYS
    assert body["model"] == {"name": card.name, "version": card.version}
    findings = body["findings"]
    assert [f["label"] for f in findings] == card.labels
    observed = np.array([f["probability"] for f in findings])
    assert ((observed >= 0) & (observed <= 1)).all()
    np.testing.assert_allclose(observed, probabilities, atol=1e-5)
    for f in findings:
        s_thr = card.thresholds.screening[f["label"]].threshold
        d_thr = card.thresholds.diagnosis[f["label"]].threshold
        assert (f["screening_threshold"], f["diagnosis_threshold"]) == (s_thr, d_thr)
        assert f["screening_positive"] is (f["probability"] >= s_thr)
        assert f["diagnosis_positive"] is (f["probability"] >= d_thr)
    pathologies = [f for f in findings if f["label"] != NO_FINDING]
    diagnosis = [f["label"] for f in pathologies if f["diagnosis_positive"]]
    assert body["triage"] == {
        "screening_positive": [f["label"] for f in pathologies if f["screening_positive"]],
        "diagnosis_positive": diagnosis,
        "abnormal": bool(diagnosis),
    }
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    assert all(v >= 0 for v in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["decode"]


def assert_dicom_uids(body: dict, path: Path, response_text: str) -> None:
    """The response names the file's study/series/SOP instance UIDs and no patient field."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert body["dicom"] == {
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
    }
    text = response_text.lower()
    assert "patient" not in text
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress"):
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 3:
            assert value.lower() not in text, (path.name, keyword)
