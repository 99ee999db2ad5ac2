"""The eligibility gate: only frontal chest radiographs are scored (DESIGN.md, "Eligibility").

DICOMs are built with pydicom from real NIH PNGs (tests/dicom_factory.py) the way modalities
write them, then sent through the real HTTP app (TestClient, bundled model, real ONNX session):
each ineligible kind is a 422 ``not-eligible`` naming the attribute and its value under the
default policy, and is scored with a warning under ``CXR_ELIGIBILITY=warn``; eligible controls
are scored with the ``image`` block.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset

from app.imaging.eligibility import (
    DX_FOR_PROCESSING,
    Eligibility,
    check_eligibility,
)
from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from tests import dicom_factory as factory
from tests.contract import PROBLEM_KEYS, chest_dicoms

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
FAKE_VALUES = (
    factory.FAKE_PATIENT_NAME,
    factory.FAKE_PATIENT_ID,
    factory.FAKE_BIRTH_DATE,
    factory.FAKE_ACCESSION,
    "FAKE^REFERRER",
    "FAKE HOSPITAL",
)

# Each ineligible kind: factory options, and the (attribute, value) that must be named.
INELIGIBLE: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {
    "lateral LL": ({"view_position": "LL"}, ("ViewPosition", "LL")),
    "lateral RL": ({"view_position": "RL"}, ("ViewPosition", "RL")),
    "LATERAL": ({"view_position": "LATERAL"}, ("ViewPosition", "LATERAL")),
    "left lateral decubitus": ({"view_position": "LLD"}, ("ViewPosition", "LLD")),
    "oblique": ({"view_position": "RAO"}, ("ViewPosition", "RAO")),
    "AP and lateral in one value": (
        {"view_position": "AP LATERAL"},
        ("ViewPosition", "AP LATERAL"),
    ),
    "DX FOR PROCESSING (SOP class)": (
        {"sop_class": DX_FOR_PROCESSING, "presentation_intent": "FOR PROCESSING"},
        ("SOPClassUID", DX_FOR_PROCESSING),
    ),
    "DX FOR PROCESSING (intent)": (
        {"presentation_intent": "FOR PROCESSING"},
        ("PresentationIntentType", "FOR PROCESSING"),
    ),
    "knee": ({"body_part": "KNEE", "view_position": "AP"}, ("BodyPartExamined", "KNEE")),
    "hand": ({"body_part": "HAND", "modality": "CR"}, ("BodyPartExamined", "HAND")),
    "abdomen": ({"body_part": "ABDOMEN", "view_position": "AP"}, ("BodyPartExamined", "ABDOMEN")),
    "thoracic spine": ({"body_part": "TSPINE"}, ("BodyPartExamined", "TSPINE")),
    "chest CT slice": (
        {"modality": "CT", "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"), "view_position": None},
        ("Modality", "CT"),
    ),
    "MR": ({"modality": "MR", "view_position": None}, ("Modality", "MR")),
    "mammogram": (
        {"modality": "MG", "sop_class": MG_FOR_PRESENTATION, "body_part": "BREAST"},
        ("Modality", "MG"),
    ),
    "ultrasound": ({"modality": "US", "sop_class": US_IMAGE}, ("Modality", "US")),
    "localizer": (
        {"image_type": ("DERIVED", "PRIMARY", "LOCALIZER")},
        ("ImageType", "LOCALIZER"),
    ),
}
# Objects without pixels that a PACS auto-route sends along with the images.
NON_IMAGES = {
    "SR": BASIC_TEXT_SR,
    "KO": KEY_OBJECT_SELECTION,
    "PR": GRAYSCALE_PR,
}
ELIGIBLE: dict[str, dict[str, Any]] = {
    "DX PA": {},
    "DX AP": {"view_position": "AP"},
    "AP SUPINE (non-standard, still frontal)": {"view_position": "AP SUPINE"},
    "CR PA": {"modality": "CR"},
    "CR MONOCHROME1": {"modality": "CR", "photometric": "MONOCHROME1"},
    "Secondary Capture of a CR": {"modality": "CR", "sop_class": factory.SECONDARY_CAPTURE},
    "THORAX": {"body_part": "THORAX"},
    "lower-case chest": {"body_part": "chest"},
    "CHEST_PA": {"body_part": "CHEST_PA"},
    "DERIVED PRIMARY (as the real CR files)": {"image_type": ("DERIVED", "PRIMARY")},
}


def _settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "model_dir": DEFAULT_MODEL_DIR,
        "intra_op_threads": 1,
        "decode_workers": 2,
        "audit_db": None,
        "api_keys": None,
        "log_json": False,
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bundled() -> Path:
    if not (DEFAULT_MODEL_DIR / "model_card.json").is_file():
        pytest.skip(f"no bundled model at {DEFAULT_MODEL_DIR}")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def enforce(bundled: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings())) as client:
        yield client


@pytest.fixture(scope="module")
def warn(bundled: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(eligibility="warn"))) as client:
        yield client


@pytest.fixture(scope="module")
def gray(data_dir: Path) -> np.ndarray:
    """A real NIH radiograph at 512 px (the gate reads the header; smaller is faster)."""
    path = factory.nih_pngs(data_dir)[3]
    return np.asarray(Image.fromarray(factory.png_gray(path)).resize((512, 512)))


def _post(client: TestClient, data: bytes) -> Any:
    return client.post("/predict", content=data, headers={"content-type": "application/dicom"})


def _no_fake_values(text: str) -> None:
    for value in FAKE_VALUES:
        assert value.lower() not in text.lower(), value


# --------------------------------------------------------------------------------------------
# The rules, on headers alone


@pytest.mark.parametrize("kind", sorted(INELIGIBLE))
def test_each_ineligible_kind_is_refused_naming_the_attribute(gray, kind: str) -> None:
    options, (attribute, value) = INELIGIBLE[kind]
    # Read back header-only, as the PACS receiver may: the gate must not need the pixels.
    data = factory.to_bytes(factory.make_dataset(gray, **options))
    verdict = check_eligibility(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    assert not verdict.eligible
    assert (attribute, value) in [(r.attribute, r.value) for r in verdict.refusals]
    named = next(r for r in verdict.refusals if r.attribute == attribute)
    assert named.reason.startswith(f"{attribute} ")
    assert value in named.reason or attribute == "SOPClassUID"


@pytest.mark.parametrize("kind", sorted(ELIGIBLE))
def test_eligible_controls_pass_without_warnings(gray, kind: str) -> None:
    verdict = check_eligibility(factory.make_dataset(gray, **ELIGIBLE[kind]))
    assert verdict == Eligibility((), ())
    assert verdict.eligible


def test_the_reason_for_a_lateral_is_the_one_the_pacs_lists(gray) -> None:
    verdict = check_eligibility(factory.make_dataset(gray, view_position="LL"))
    assert [r.reason for r in verdict.refusals] == ["ViewPosition LL is not frontal"]


def test_missing_attributes_are_warnings_not_refusals(gray) -> None:
    ds = factory.make_dataset(
        gray, modality="OT", sop_class=factory.SECONDARY_CAPTURE, body_part=None, view_position=None
    )
    verdict = check_eligibility(ds)
    assert verdict.eligible
    assert len(verdict.warnings) == 3
    for keyword in ("Modality", "BodyPartExamined", "ViewPosition"):
        assert any(w.startswith(keyword) for w in verdict.warnings), keyword


def test_coded_sequences_stand_in_for_absent_attributes(gray) -> None:
    def coded(value: str, meaning: str) -> list[Dataset]:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
        return [item]

    frontal = factory.make_dataset(gray, body_part=None, view_position=None)
    frontal.AnatomicRegionSequence = coded("43799004", "Chest")
    frontal.ViewCodeSequence = coded("399348003", "postero-anterior")
    assert check_eligibility(frontal) == Eligibility((), ())
    lateral = factory.make_dataset(gray, body_part=None, view_position=None)
    lateral.AnatomicRegionSequence = coded("72696002", "Knee")
    lateral.ViewCodeSequence = coded("399198007", "right lateral")
    assert {r.attribute for r in check_eligibility(lateral).refusals} == {
        "AnatomicRegionSequence",
        "ViewCodeSequence",
    }


def test_a_misfiled_free_text_value_is_never_quoted(gray) -> None:
    ds = factory.make_dataset(gray)
    ds.BodyPartExamined = factory.FAKE_PATIENT_NAME  # a patient name in a CS field
    verdict = check_eligibility(ds)
    assert [(r.attribute, r.value) for r in verdict.refusals] == [
        ("BodyPartExamined", "(non-standard value)")
    ]
    _no_fake_values(repr(verdict))


def test_real_shared_dicoms(dicom_dir: Path) -> None:
    """The real chest files are all eligible with nothing missing; the real hip and tibia
    radiographs are refused on BodyPartExamined."""
    chest = chest_dicoms(dicom_dir)
    assert len(chest) == 7
    for path in chest:
        verdict = check_eligibility(pydicom.dcmread(path, stop_before_pixels=True))
        assert verdict == Eligibility((), ()), path.name
    nonchest = sorted((dicom_dir / "nonchest").glob("*.dcm"))
    assert nonchest
    for path in nonchest:
        verdict = check_eligibility(pydicom.dcmread(path, stop_before_pixels=True))
        assert [r.attribute for r in verdict.refusals] == ["BodyPartExamined"], path.name


# --------------------------------------------------------------------------------------------
# Through the HTTP app


@pytest.mark.parametrize("kind", sorted(INELIGIBLE))
def test_enforce_answers_422_not_eligible(enforce: TestClient, gray, kind: str) -> None:
    options, (attribute, value) = INELIGIBLE[kind]
    r = _post(enforce, factory.to_bytes(factory.make_dataset(gray, **options)))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert set(body) >= PROBLEM_KEYS | {"refusals"}
    assert body["type"].endswith("/not-eligible")
    assert {"attribute": attribute, "value": value} in [
        {"attribute": x["attribute"], "value": x["value"]} for x in body["refusals"]
    ]
    assert attribute in body["detail"]
    _no_fake_values(r.text)


@pytest.mark.parametrize("kind", sorted(NON_IMAGES))
def test_objects_without_pixels_are_not_eligible(enforce: TestClient, gray, kind: str) -> None:
    ds = factory.make_dataset(gray, modality=kind, sop_class=NON_IMAGES[kind], view_position=None)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    r = _post(enforce, factory.to_bytes(ds))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["type"].endswith("/not-eligible")
    assert ("Modality", kind) in [(x["attribute"], x["value"]) for x in body["refusals"]]


@pytest.mark.parametrize(
    "kind", ["lateral LL", "DX FOR PROCESSING (intent)", "knee", "chest CT slice"]
)
def test_warn_scores_them_with_a_warning(warn: TestClient, gray, kind: str) -> None:
    options, (attribute, value) = INELIGIBLE[kind]
    r = _post(warn, factory.to_bytes(factory.make_dataset(gray, **options)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["findings"]) > 1
    flagged = [w for w in body["warnings"] if w.startswith("not eligible")]
    assert any(attribute in w and value in w for w in flagged), body["warnings"]
    assert body["image"]["rows"] == 512


@pytest.mark.parametrize("kind", sorted(ELIGIBLE))
def test_eligible_controls_are_scored_with_the_image_block(
    enforce: TestClient, gray, kind: str
) -> None:
    options = ELIGIBLE[kind]
    ds = factory.make_dataset(gray, **options)
    r = _post(enforce, factory.to_bytes(ds))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["warnings"] == []
    assert body["image"] == {
        "modality": options.get("modality", "DX"),
        "view_position": options.get("view_position", "PA"),
        "body_part": str(options.get("body_part", "CHEST")).upper(),
        "photometric_interpretation": options.get("photometric", "MONOCHROME2"),
        "rows": 512,
        "columns": 512,
        "bits_stored": 12,
        "window_source": "window",
    }
    assert body["dicom"]["sop_instance_uid"] == ds.SOPInstanceUID
    _no_fake_values(r.text)


def test_missing_attributes_are_scored_with_warnings(enforce: TestClient, gray) -> None:
    ds = factory.make_dataset(gray, body_part=None, view_position=None, window=None)
    r = _post(enforce, factory.to_bytes(ds))
    assert r.status_code == 200, r.text
    body = r.json()
    assert any(w.startswith("BodyPartExamined is absent") for w in body["warnings"])
    assert any(w.startswith("ViewPosition is absent") for w in body["warnings"])
    assert body["image"]["body_part"] is None and body["image"]["view_position"] is None
    assert body["image"]["window_source"] == "min_max"


def test_real_chest_dicoms_are_scored_and_real_hips_refused(
    enforce: TestClient, dicom_dir: Path
) -> None:
    # Header-only eligibility of all of them is checked above; here one CR, one DX and one SC.
    names = ("pydicomdata__RG1_UNCR.dcm", "pylibjpegdata__966_fixed.dcm", "torchxrayvision__siim")
    paths = [p for p in chest_dicoms(dicom_dir) if p.name.startswith(names)]
    assert len(paths) == 3
    for path in paths:
        r = _post(enforce, path.read_bytes())
        assert r.status_code == 200, (path.name, r.text)
        image = r.json()["image"]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (image["modality"], image["view_position"], image["body_part"]) == (
            ds.Modality,
            ds.ViewPosition,
            ds.BodyPartExamined,
        )
        assert (image["rows"], image["columns"]) == (ds.Rows, ds.Columns)
    hip = dicom_dir / "nonchest" / "pylibjpegdata__RG2_JLSL.dcm"
    r = _post(enforce, hip.read_bytes())
    assert r.status_code == 422
    assert r.json()["refusals"][0] == {
        "attribute": "BodyPartExamined",
        "value": "HIP",
        "reason": "BodyPartExamined HIP is not the chest",
    }


def test_png_has_no_metadata_and_is_scored_as_today(enforce: TestClient, data_dir: Path) -> None:
    path = factory.nih_pngs(data_dir)[0]
    r = enforce.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["warnings"] == []
    assert body["image"] == {
        "modality": None,
        "view_position": None,
        "body_part": None,
        "photometric_interpretation": None,
        "rows": 1024,
        "columns": 1024,
        "bits_stored": 8,
        "window_source": None,
    }


def test_a_study_with_a_pa_and_a_lateral(enforce: TestClient, data_dir: Path) -> None:
    """What a PACS auto-route sends: the PA is scored, the lateral refused, same study."""
    small = [
        np.asarray(Image.open(p).convert("L").resize((256, 256)))
        for p in factory.nih_pngs(data_dir)[:2]
    ]
    pa, lateral = factory.make_study(small, views=("PA", "LL"))
    assert pa.StudyInstanceUID == lateral.StudyInstanceUID
    assert _post(enforce, factory.to_bytes(pa)).status_code == 200
    r = _post(enforce, factory.to_bytes(lateral))
    assert r.status_code == 422
    assert r.json()["refusals"][0]["reason"] == "ViewPosition LL is not frontal"


@pytest.mark.parametrize(
    "value",
    ["", " ", "\x00", "Lateral view of FAKE^PATIENT", "ÄÖÜ", "PA\\LL", "a" * 70, "1.2.3.x"],
)
def test_hostile_values_never_raise_and_are_never_quoted(gray, value: str) -> None:
    ds = factory.make_dataset(gray)
    for keyword in ("Modality", "BodyPartExamined", "ViewPosition", "PresentationIntentType"):
        ds.__setattr__(keyword, value)
    ds.SOPClassUID = value.strip("\x00 ") or factory.DX_FOR_PRESENTATION
    verdict = check_eligibility(pydicom.dcmread(io.BytesIO(factory.to_bytes(ds))))
    for refusal in verdict.refusals:
        assert refusal.value in refusal.reason or refusal.attribute == "SOPClassUID"
        assert "FAKE" not in refusal.reason and "Ä" not in refusal.reason
