"""The DICOM result objects: SR and SC from a real study scored by the served model.

The source study is a PA and a lateral built from shared NIH images (fake patient data), gated
by the eligibility rules and scored by ``models/default`` through ONNX Runtime. The SR is read
back twice: by pydicom/highdicom and by DCMTK's ``dsrdump`` (strict mode, a second and
independent SR parser), and both readings must state what the study result says.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from app.imaging.decode import decode_image
from app.imaging.heatmap import render_overlay
from app.inference.runtime import ModelRuntime
from app.pacs.model import InstanceStatus, ResultObject, StudyResult
from app.pacs.results import STATEMENT, write_results
from tests.dicom_factory import (
    FAKE_ACCESSION,
    FAKE_BIRTH_DATE,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    make_dataset,
    make_study,
    nih_pngs,
)
from tests.pacs_out_fixtures import default_runtime, score_study, store_study

PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return default_runtime()


@pytest.fixture(scope="module")
def pngs(data_dir: Path) -> list[Path]:
    found = nih_pngs(data_dir)
    if len(found) < 3:
        pytest.skip("fewer than 3 shared 1024 px NIH images")
    return found


@pytest.fixture(scope="module")
def written(
    runtime: ModelRuntime, pngs: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[StudyResult, dict[str, ResultObject]]:
    """A PA (scored) + lateral (ineligible) study, its result, and the SR/SC written for it."""
    root = tmp_path_factory.mktemp("results")
    paths = store_study(make_study(pngs[:2], views=("PA", "LL"), modality="DX"), root / "in")
    result = score_study(paths, runtime)
    objects = write_results(result, runtime.card, root / "out")
    return result, {o.kind: o for o in objects}


# A source's own invalid value, copied as it is into the Patient/Study modules, is the one
# thing dsrdump may warn about; anything about the content tree fails.
_COPIED_VALUE_WARNING = re.compile(
    r"W: \w+ \([0-9a-f]{4},[0-9a-f]{4}\) violates VR definition in "
    r"(PatientModule|GeneralStudyModule|PatientStudyModule)"
)


def _dsrdump(path: Path, *, source_warnings: bool = False) -> str:
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.skip("DCMTK dsrdump not installed (apt-get install dcmtk)")
    # Strict: no -Ee/-Ec, so content or relationship errors make it fail.
    done = subprocess.run(
        [exe, "+Pl", "+Pu", "+Pc", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    if source_warnings:
        lines = [line for line in lines if not _COPIED_VALUE_WARNING.fullmatch(line)]
    assert lines == [], done.stderr
    return done.stdout


def _groups(dump: str) -> list[str]:
    """The text of each TID 1501 measurement group in a dsrdump listing."""
    return dump.split('"Measurement Group")')[1:]


def test_result_set_is_one_sr_and_one_sc(written: tuple[StudyResult, dict[str, ResultObject]]):
    result, objects = written
    assert set(objects) == {"sr", "sc"}
    sr, sc = dcmread(objects["sr"].path), dcmread(objects["sc"].path)
    source_series = {i.series_instance_uid for i in result.instances}
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
    # In the source study, each in a new series of its own.
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == result.study_instance_uid
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert {sr.SeriesInstanceUID, sc.SeriesInstanceUID}.isdisjoint(source_series)
    for obj, ds in ((objects["sr"], sr), (objects["sc"], sc)):
        assert ds.SOPInstanceUID == obj.sop_instance_uid
        assert obj.path.name == f"{obj.sop_instance_uid}.dcm"


@pytest.mark.parametrize("kind", ["sr", "sc"])
def test_patient_and_study_modules_copied_from_source(
    written: tuple[StudyResult, dict[str, ResultObject]], kind: str
):
    result, objects = written
    source = dcmread(result.scored[0].path, stop_before_pixels=True)
    ds = dcmread(objects[kind].path, stop_before_pixels=True)
    assert source.PatientName == FAKE_PATIENT_NAME and source.AccessionNumber == FAKE_ACCESSION
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.PatientID == FAKE_PATIENT_ID and ds.PatientBirthDate == FAKE_BIRTH_DATE


def test_sr_read_back_by_highdicom(
    written: tuple[StudyResult, dict[str, ResultObject]], runtime: ModelRuntime
):
    result, objects = written
    card = runtime.card
    sr = hd.sr.srread(objects["sr"].path)
    assert sr.VerificationFlag == "UNVERIFIED"
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(card.labels) == len(result.findings)
    scored = [i.sop_instance_uid for i in result.scored]
    lateral = [i for i in result.instances if i.status is InstanceStatus.INELIGIBLE]
    assert len(scored) == 1 and len(lateral) == 1
    for group, finding in zip(groups, result.findings, strict=True):
        assert group.finding_type.meaning == finding.label.replace("_", " ")
        assert group.finding_type.value == finding.label
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Probability"] == pytest.approx(finding.probability, abs=1e-6)
        assert values["Screening threshold"] == pytest.approx(finding.screening_threshold, abs=1e-6)
        assert values["Diagnosis threshold"] == pytest.approx(finding.diagnosis_threshold, abs=1e-6)
        evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
        assert evaluations == {
            "Screening result": "Positive" if finding.screening_positive else "Negative",
            "Diagnosis result": "Positive" if finding.diagnosis_positive else "Negative",
        }
        assert [s.referenced_sop_instance_uid for s in group.source_images] == scored
    # Every instance of the study is evidence; only the PA is a source of the measurements.
    evidence = [
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(i.sop_instance_uid for i in result.instances)
    # Contributing Equipment names the model and its version.
    equipment = [
        e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == card.name
    ]
    assert len(equipment) == 1 and card.version in list(equipment[0].SoftwareVersions)
    assert STATEMENT in equipment[0].ContributionDescription
    # Statement, priority and the lateral with its reason, at report level.
    texts = [
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue)
        for item in _report_items(sr, "Qualitative Evaluations")
    ]
    assert ("Comment", STATEMENT) in texts
    assert ("Triage priority", result.priority) in texts
    not_scored = [text for name, text in texts if name == "Instance not scored"]
    assert len(not_scored) == 1
    assert lateral[0].sop_instance_uid in not_scored[0] and lateral[0].reason in not_scored[0]
    assert "LL" in lateral[0].reason


def _report_items(sr: hd.sr.ComprehensiveSR, container: str) -> list:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning == container:
            return list(item.ContentSequence)
    raise AssertionError(f"no {container} container")


def test_sr_read_back_by_dsrdump(
    written: tuple[StudyResult, dict[str, ResultObject]], runtime: ModelRuntime
):
    result, objects = written
    dump = _dsrdump(objects["sr"].path)
    assert "Comprehensive SR Document" in dump
    assert re.search(r"Verification Flag\s+: UNVERIFIED", dump)
    assert re.search(rf"Patient\s+: {re.escape(FAKE_PATIENT_NAME)} ", dump)  # copied module
    groups = _groups(dump)
    assert len(groups) == len(result.findings)
    scored = result.scored[0].sop_instance_uid
    for text, finding in zip(groups, result.findings, strict=True):
        meaning = finding.label.replace("_", " ")
        assert f'"Finding")=({finding.label},99CXRTRIAGE,"{meaning}")' in text
        for name, value in (
            ("Probability", finding.probability),
            ("Screening threshold", finding.screening_threshold),
            ("Diagnosis threshold", finding.diagnosis_threshold),
        ):
            match = re.search(rf'"{name}"\)="([^"]+)" \(1,UCUM,"no units"\)', text)
            assert match is not None, name
            assert float(match.group(1)) == pytest.approx(value, abs=1e-6)
        for name, flag in (
            ("Screening result", finding.screening_positive),
            ("Diagnosis result", finding.diagnosis_positive),
        ):
            expected = '10828004,SCT,"Positive"' if flag else '260385009,SCT,"Negative"'
            assert f'"{name}")=({expected})' in text
        assert f'"Source of Measurement")=(DX image,"{scored}")' in text
        assert f'"Algorithm Version")="{runtime.card.version}"' in text
    assert f'"Comment")="{STATEMENT}"' in dump
    lateral = next(i for i in result.instances if i.status is InstanceStatus.INELIGIBLE)
    assert lateral.sop_instance_uid in dump.split('"Instance not scored")', 1)[1]


def test_superseding_sr_lists_its_predecessor(
    written: tuple[StudyResult, dict[str, ResultObject]],
    runtime: ModelRuntime,
    pngs: list[Path],
):
    """A late instance re-triages the study: the new SR replaces the old one and says so."""
    result, objects = written
    out_dir = objects["sr"].path.parent
    late = make_dataset(
        pngs[2],
        study_uid=result.study_instance_uid,
        view_position="AP",
        instance_number=3,
        series_number=3,
    )
    late_path = store_study([late], result.scored[0].path.parent)[0]
    paths = [i.path for i in result.instances] + [late_path]
    again = score_study(
        paths,
        runtime,
        revision=2,
        supersedes=[objects["sr"].sop_instance_uid, objects["sc"].sop_instance_uid],
    )
    new = {o.kind: o for o in write_results(again, runtime.card, out_dir)}
    assert {o.sop_instance_uid for o in new.values()}.isdisjoint(
        o.sop_instance_uid for o in objects.values()
    )
    sr, old_sr = dcmread(new["sr"].path), dcmread(objects["sr"].path)
    assert sr.SeriesInstanceUID == old_sr.SeriesInstanceUID and sr.InstanceNumber == 2
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == result.study_instance_uid
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old_sr.SeriesInstanceUID
    assert [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence
    ] == [
        (ComprehensiveSRStorage, objects["sr"].sop_instance_uid)  # the SR only, not the SC
    ]
    assert "Predecessor Docs    : 1" in _dsrdump(new["sr"].path)
    # Two frontal images scored now: both referenced by every group.
    groups = hd.sr.srread(new["sr"].path).content.get_image_measurement_groups()
    assert {s.referenced_sop_instance_uid for s in groups[0].source_images} == {
        i.sop_instance_uid for i in again.scored
    }


def test_writing_the_same_result_again_gives_the_same_objects(
    written: tuple[StudyResult, dict[str, ResultObject]], runtime: ModelRuntime, tmp_path: Path
):
    """UIDs come from the result, so a rewrite after a crash is deduplicated downstream."""
    result, objects = written
    again = {o.kind: o.sop_instance_uid for o in write_results(result, runtime.card, tmp_path)}
    assert again == {kind: o.sop_instance_uid for kind, o in objects.items()}


def test_sc_is_the_overlay_at_source_resolution(
    written: tuple[StudyResult, dict[str, ResultObject]], runtime: ModelRuntime
):
    result, objects = written
    assert result.explained is not None
    sc = dcmread(objects["sc"].path)
    source_path = next(
        i.path for i in result.instances if i.sop_instance_uid == result.explained.sop_instance_uid
    )
    source = dcmread(source_path)
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)  # 1024 px: not resized
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BitsAllocated == 8 and sc.PlanarConfiguration == 0
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "ORIGINAL" not in sc.ImageType and STATEMENT in sc.ImageComments
    # The pixels are the overlay of the decoded source, as render_overlay draws it...
    decoded = decode_image(source_path.read_bytes()).pixels
    expected = render_overlay(
        decoded,
        result.explained.grid,
        finding=result.explained.label.replace("_", " "),
        probability=result.explained.probability,
        max_side=2048,
        caption=f"{runtime.card.name} {runtime.card.version} - {STATEMENT.upper()}",
    )
    pixels = sc.pixel_array
    assert pixels.shape == (source.Rows, source.Columns, 3)
    np.testing.assert_array_equal(pixels, expected)
    # ...which is the radiograph (not inverted, not blank) with colour laid over it.
    gray = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float64)
    original = decoded.astype(np.float64) * 255.0
    assert np.corrcoef(gray.ravel(), original.ravel())[0, 1] > 0.5
    assert np.abs(pixels[..., 0].astype(int) - pixels[..., 2].astype(int)).max() > 100


def test_sc_of_a_large_monochrome1_cr_is_capped_at_2048(
    runtime: ModelRuntime, pngs: list[Path], tmp_path: Path
):
    """A 2600 x 2210 CR (MONOCHROME1, 14 bit): the SC keeps the aspect with its long side at
    2048 and scales the pixel spacing; it is the same picture, not a negative."""
    big = np.asarray(
        Image.open(pngs[0]).convert("L").resize((2210, 2600), Image.Resampling.BICUBIC)
    )
    ds = make_dataset(big, modality="CR", photometric="MONOCHROME1", bits_stored=14)
    paths = store_study([ds], tmp_path / "in")
    result = score_study(paths, runtime)
    objects = {o.kind: o for o in write_results(result, runtime.card, tmp_path / "out")}
    sc = dcmread(objects["sc"].path)
    assert sc.Rows == 2048
    assert sc.Columns == round(2210 * 2048 / 2600)
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([0.143 * 2600 / 2048] * 2, rel=1e-4)
    gray = np.asarray(Image.fromarray(sc.pixel_array).convert("L"), dtype=np.float64)
    small = np.asarray(Image.fromarray(big).resize((sc.Columns, sc.Rows)), dtype=np.float64)
    assert np.corrcoef(gray.ravel(), small.ravel())[0, 1] > 0.5


def test_study_with_nothing_eligible_gets_an_sr_saying_why(
    runtime: ModelRuntime, pngs: list[Path], tmp_path: Path
):
    ds = make_dataset(pngs[1], view_position="LL")
    paths = store_study([ds], tmp_path / "in")
    result = score_study(paths, runtime)
    assert result.findings == [] and result.explained is None
    objects = write_results(result, runtime.card, tmp_path / "out")
    assert [o.kind for o in objects] == ["sr"]
    dump = _dsrdump(objects[0].path)
    assert '"Finding")=(NO-IMAGE-SCORED,99CXRTRIAGE,' in dump
    assert '"Study scored")=(373067005,SCT,"No")' in dump
    assert ds.SOPInstanceUID in dump and "LL" in dump and STATEMENT in dump
    sr = hd.sr.srread(objects[0].path)
    assert (
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == ds.SOPInstanceUID
    )


def test_writing_logs_no_patient_field(
    written: tuple[StudyResult, dict[str, ResultObject]],
    runtime: ModelRuntime,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    result, _ = written
    with caplog.at_level(logging.DEBUG):
        write_results(result, runtime.card, tmp_path)
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for value in (
        FAKE_PATIENT_NAME,
        FAKE_PATIENT_ID,
        FAKE_ACCESSION,
        "FAKE HOSPITAL",
        "FAKE^REFERRER",
    ):
        assert value not in text


REAL_CHEST = (
    "pylibjpegdata__966_fixed.dcm",  # anonymised by hashing: PatientBirthDate is no date
    "pylibjpegdata__966.dcm",  # a broken JPEG 2000 stream: undecodable, SR only
)


@pytest.mark.parametrize("name", REAL_CHEST)
def test_real_chest_dicoms_get_results_with_their_modules_copied_as_they_are(
    runtime: ModelRuntime, dicom_dir: Path, tmp_path: Path, name: str
):
    """Real files carry what modalities write, odd values included: they are copied as they
    are (never validated away, never a crash), and dsrdump still reads the SR."""
    path = dicom_dir / "chest" / name
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data")
    stored = tmp_path / "in" / name
    stored.parent.mkdir()
    stored.write_bytes(path.read_bytes())
    result = score_study([stored], runtime)
    objects = {o.kind: o for o in write_results(result, runtime.card, tmp_path / "out")}
    source = dcmread(stored, stop_before_pixels=True)
    undecodable = result.instances[0].status is InstanceStatus.UNDECODABLE
    assert set(objects) == ({"sr"} if undecodable else {"sr", "sc"})
    for obj in objects.values():
        ds = dcmread(obj.path, stop_before_pixels=True)
        for keyword in PATIENT_STUDY_KEYWORDS:
            assert ds.get(keyword) == source.get(keyword), keyword
    dump = _dsrdump(objects["sr"].path, source_warnings=True)
    if undecodable:
        assert f"{source.SOPInstanceUID}: undecodable: " in dump
    else:
        sc = dcmread(objects["sc"].path, stop_before_pixels=True)
        scale = min(1.0, 2048 / max(source.Rows, source.Columns))
        assert (sc.Rows, sc.Columns) == (round(source.Rows * scale), round(source.Columns * scale))


def test_non_ascii_patient_name_and_unusual_sex_are_copied_with_their_character_set(
    runtime: ModelRuntime, pngs: list[Path], tmp_path: Path
):
    ds = make_dataset(
        pngs[0], SpecificCharacterSet="ISO_IR 192", patient_name="Müller^Jürgen", sex="U"
    )
    result = score_study(store_study([ds], tmp_path / "in"), runtime)
    objects = {o.kind: o for o in write_results(result, runtime.card, tmp_path / "out")}
    for obj in objects.values():
        copied = dcmread(obj.path)
        assert copied.SpecificCharacterSet == "ISO_IR 192"
        assert str(copied.PatientName) == "Müller^Jürgen" and copied.PatientSex == "U"
    assert "Patient             : Müller^Jürgen (U" in _dsrdump_utf8(objects["sr"].path)


def _dsrdump_utf8(path: Path) -> str:
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.skip("DCMTK dsrdump not installed (apt-get install dcmtk)")
    done = subprocess.run([exe, "+U8", str(path)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode("utf-8")
