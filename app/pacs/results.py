"""A study result as DICOM objects a PACS files into the source study, written with highdicom.

Two objects per result, each in its own new series of the source study (one modality per
series), both stating that they are an unverified AI result, not for diagnostic use:

- **SR**: a TID 1500 Measurement Report in a Comprehensive SR document. TID 1500 is what AI
  result exchange uses (IHE AI Results, OHIF's SR viewer, dcm4che's renderer), and the
  Comprehensive SR IOD, rather than Enhanced or Comprehensive 3D SR, is the one every reader
  has handled the longest: DCMTK's ``dsrdump`` and ``dsr2html``, Orthanc (which stores any
  storage SOP class and shows the tree in its explorer), Weasis, dcm4chee. Nothing here needs
  3D coordinates, so nothing is lost by it. One TID 1501 measurement group per model label:
  the Finding (CODE, meaning = the NIH label with spaces), the probability and both thresholds
  as NUMs, the screening and diagnosis results as qualitative evaluations (SCT Positive /
  Negative), the model as Algorithm Identification and the scored source images as references.
  The report-level Qualitative Evaluations container says the priority, the statement and each
  instance that was not scored with its reason. ``VerificationFlag`` is UNVERIFIED and a
  superseding report lists its predecessors (Predecessor Documents Sequence).
- **SC**: a Secondary Capture of the heatmap overlay over the image that drove the explained
  finding, at that image's resolution (long side capped at 2048), legend, finding and statement
  burned in (``BurnedInAnnotation`` YES).

Patient and Study modules are copied from a stored source file: this is the only place where
patient fields are written. Object UIDs are derived from the result (study, revision, model,
the instances and their pixel hashes), so writing the same result twice gives the same objects
and the outbox's deduplication on SOP Instance UID holds across a crash between write and
enqueue.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from app import __version__
from app.card import ModelCard
from app.imaging.decode import decode_image
from app.pacs.model import Explained, InstanceOutcome, InstanceStatus, ResultObject, StudyResult

logger = logging.getLogger(__name__)
# highdicom narrates every module it copies at INFO; one result would be a dozen lines.
logging.getLogger("highdicom").setLevel(logging.WARNING)

MANUFACTURER = "cxr-triage"
STATEMENT = "Unverified AI result, not for diagnostic use"
SR_SERIES_NUMBER = 9100
SC_SERIES_NUMBER = 9101
SC_MAX_SIDE = 2048

# Our own concepts live in a private coding scheme, declared in each SR (PS3.16 8.2: "99" +
# an identifier is the form for private schemes).
SCHEME = "99CXRTRIAGE"
PROBABILITY = Code("PROB", SCHEME, "Probability")
SCREENING_THRESHOLD = Code("SCREEN-THR", SCHEME, "Screening threshold")
DIAGNOSIS_THRESHOLD = Code("DIAG-THR", SCHEME, "Diagnosis threshold")
SCREENING_RESULT = Code("SCREEN-RESULT", SCHEME, "Screening result")
DIAGNOSIS_RESULT = Code("DIAG-RESULT", SCHEME, "Diagnosis result")
PRIORITY = Code("PRIORITY", SCHEME, "Triage priority")
NOT_SCORED = Code("NOT-SCORED", SCHEME, "Instance not scored")
NO_IMAGE_SCORED = Code("NO-IMAGE-SCORED", SCHEME, "No image of the study could be scored")
STUDY_SCORED = Code("STUDY-SCORED", SCHEME, "Study scored")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
UNITLESS = codes.UCUM.NoUnits


def write_results(result: StudyResult, card: ModelCard, out_dir: Path) -> list[ResultObject]:
    """Write the SR (always) and the SC (when a finding is explained) into ``out_dir``.

    Files are named ``<SOPInstanceUID>.dcm``; a superseded report found there is read for the
    Predecessor Documents Sequence, so keep one folder per study (or one for all).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = _read_headers(result.instances)
    if not headers:
        raise ValueError(
            f"study {result.study_instance_uid}: none of its stored instances could be read"
        )
    objects = [
        _write(build_sr(result, card, headers, _predecessors(result, out_dir)), "sr", out_dir)
    ]
    if result.explained is not None:
        sc = build_sc(result, card, headers)
        if sc is not None:
            objects.append(_write(sc, "sc", out_dir))
    return objects


# --------------------------------------------------------------------------------------- SR


def build_sr(
    result: StudyResult,
    card: ModelCard,
    headers: dict[str, Dataset],
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.ComprehensiveSR:
    """The TID 1500 report of ``result`` (see the module docstring for its tree)."""
    scored = [headers[i.sop_instance_uid] for i in result.scored if i.sop_instance_uid in headers]
    reference = scored[0] if scored else next(iter(headers.values()))
    sop_uid = object_uid(result, "sr")
    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name, version=card.version, manufacturer=MANUFACTURER
    )
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in scored]
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(sop_uid, finding.label),
                identifier=finding.label,
            ),
            finding_type=finding_concept(finding.label),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(PROBABILITY, _num(finding.probability), UNITLESS),
                hd.sr.Measurement(SCREENING_THRESHOLD, _num(finding.screening_threshold), UNITLESS),
                hd.sr.Measurement(DIAGNOSIS_THRESHOLD, _num(finding.diagnosis_threshold), UNITLESS),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    SCREENING_RESULT, _positive(finding.screening_positive)
                ),
                hd.sr.QualitativeEvaluation(
                    DIAGNOSIS_RESULT, _positive(finding.diagnosis_positive)
                ),
            ],
            source_images=sources or None,
        )
        for finding in result.findings
    ]
    if not groups:
        # TID 1500 needs one group: say that nothing could be scored (the reasons follow).
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(sop_uid, "not scored"),
                    identifier="not scored",
                ),
                finding_type=NO_IMAGE_SCORED,
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(STUDY_SCORED, codes.SCT.No),
                ],
            )
        ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(MANUFACTURER, card.name, card.version),
        name=f"{card.name} {card.version}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=card.name[:64],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_report_evaluations(result))
    sr = hd.sr.ComprehensiveSR(
        # PS3.3 C.17.2.3: evidence is every instance of the requested procedure, not only
        # those scored; evidence[0] is where highdicom copies the Patient/Study modules from.
        evidence=[
            _constructible(reference),
            *(ds for ds in headers.values() if ds is not reference),
        ],
        content=report,
        series_instance_uid=series_uid(result.study_instance_uid, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=result.revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(predecessors) or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_contributing_equipment(card)],
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=SCHEME,
                name="cxr-triage result concepts",
                responsible_organization=MANUFACTURER,
            )
        ],
        series_description="AI triage SR - UNVERIFIED, NOT FOR DIAGNOSTIC USE",
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
    )
    _copy_patient_and_study(sr, reference)
    return sr


def finding_concept(label: str) -> hd.sr.CodedConcept:
    """A model label as a code: the value is the label as the card spells it, the meaning the
    same with spaces (``Pleural_Thickening`` → "Pleural Thickening")."""
    return hd.sr.CodedConcept(
        value=label, scheme_designator=SCHEME, meaning=label.replace("_", " ")
    )


def _report_evaluations(result: StudyResult) -> hd.sr.ContainerContentItem:
    """TID 1500's report-level Qualitative Evaluations: statement, priority, unscored images."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=STATEMENT,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=PRIORITY,
            value=str(result.priority),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    for instance in result.instances:
        if instance.status is InstanceStatus.SCORED:
            continue
        items.append(
            hd.sr.TextContentItem(
                name=NOT_SCORED,
                value=not_scored_text(instance),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def not_scored_text(instance: InstanceOutcome) -> str:
    """How the SR names an instance it did not score: its UID, status and reason."""
    reason = instance.reason or "no reason recorded"
    return f"SOP Instance {instance.sop_instance_uid}: {instance.status.value}: {reason}"


def _predecessors(result: StudyResult, out_dir: Path) -> list[Dataset]:
    """Headers of the superseded SRs (the SCs among ``supersedes`` are no documents)."""
    found = []
    for uid in result.supersedes:
        path = out_dir / f"{uid}.dcm"
        if not path.is_file():
            logger.warning(
                "superseded result object not found; not listed as predecessor",
                extra={"sop_instance_uid": uid},
            )
            continue
        ds = dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == ComprehensiveSRStorage:
            found.append(ds)
    return found


# --------------------------------------------------------------------------------------- SC


def build_sc(
    result: StudyResult, card: ModelCard, headers: dict[str, Dataset]
) -> hd.sc.SCImage | None:
    """The heatmap overlay of ``result.explained`` as a Secondary Capture, or None when its
    image is not among the stored instances."""
    explained = result.explained
    assert explained is not None
    instance = next(
        (i for i in result.instances if i.sop_instance_uid == explained.sop_instance_uid), None
    )
    source = headers.get(explained.sop_instance_uid)
    if instance is None or source is None:
        logger.error(
            "explained image is not a stored instance of the study; no secondary capture",
            extra={"sop_instance_uid": explained.sop_instance_uid},
        )
        return None
    rgb = overlay_pixels(instance.path, explained, card)
    scale = rgb.shape[0] / int(source.Rows)
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_constructible(source),
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(result.study_instance_uid, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=object_uid(result, "sc"),
        instance_number=result.revision,
        manufacturer=MANUFACTURER,
        pixel_spacing=_scaled_spacing(source, scale),
        patient_orientation=orientation or ("A", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_contributing_equipment(card)],
        series_description="AI triage heatmap - UNVERIFIED, NOT FOR DIAGNOSTIC USE",
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
    )
    if orientation is None:
        sc.PatientOrientation = ""  # Type 2C: unknown in the source, so unknown here
    _copy_patient_and_study(sc, source)
    sc.ConversionType = "WSD"  # made on a workstation from another image
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"{card.name} {card.version} heatmap ({card.heatmap_method}) for {explained.label} "
        f"(p={explained.probability:.3f}) over the source image. {STATEMENT}."
    )
    sc.ImageComments = STATEMENT
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def overlay_pixels(path: Path, explained: Explained, card: ModelCard) -> np.ndarray:
    """RGB uint8 overlay of the stored image at its own resolution (long side ≤ 2048)."""
    from app.imaging.heatmap import render_overlay

    decoded = decode_image(path.read_bytes())
    return render_overlay(
        decoded.pixels,
        np.asarray(explained.grid, dtype=np.float32),
        finding=explained.label.replace("_", " "),
        probability=float(explained.probability),
        max_side=SC_MAX_SIDE,
        caption=f"{card.name} {card.version} - {STATEMENT.upper()}",
    )


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, col = (str(v) for v in value)
    try:
        hd.PatientOrientationValuesBiped(row)
        hd.PatientOrientationValuesBiped(col)
    except ValueError:
        return None
    return row, col


def _scaled_spacing(ds: Dataset, scale: float) -> tuple[float, float] | None:
    """The source's pixel spacing at the SC's size (PixelSpacing, else ImagerPixelSpacing)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2 and scale > 0:
            try:
                return float(value[0]) / scale, float(value[1]) / scale
            except (TypeError, ValueError):
                return None
    return None


# ----------------------------------------------------------------------------------- shared


def object_uid(result: StudyResult, kind: str) -> str:
    """The SOP Instance UID of a result object: a hash of everything that decides its content
    (so the same result, written again, is the same object; a new revision is a new one)."""
    instances = sorted(
        f"{i.sop_instance_uid}|{i.pixel_hash}|{i.status.value}" for i in result.instances
    )
    return derived_uid(
        kind,
        result.study_instance_uid,
        str(result.revision),
        result.model_name,
        result.model_version,
        *instances,
    )


def series_uid(study_instance_uid: str, kind: str) -> str:
    """One SR series and one SC series per study; revisions are new instances in them."""
    return derived_uid(f"{kind} series", study_instance_uid)


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage:result-objects")


def derived_uid(*parts: str) -> str:
    """A UUID-derived UID (PS3.5 B.2, ``2.25.<UUID as integer>``) of a name-based UUID (RFC
    9562 version 5) of ``parts``: the same parts always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def _contributing_equipment(card: ModelCard) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name[:64],
        software_versions=[card.version[:64], f"cxr-triage {__version__}"],
        contribution_description=f"AI model {card.name} {card.version}. {STATEMENT}.",
    )


# What highdicom's constructors read (and validate) from the source; the real values are copied
# afterwards, element by element, whatever they hold.
_CONSTRUCTOR_FIELDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _constructible(source: Dataset) -> Dataset:
    """``source`` with the fields highdicom's constructors validate emptied: a modality's odd
    value (a hashed birth date, PatientSex "U") must not cost the study its result."""
    proxy = Dataset()
    proxy.update(source)  # shares the source's elements: replace them, never assign into them
    for keyword in _CONSTRUCTOR_FIELDS:
        if keyword in proxy:
            del proxy[keyword]
        setattr(proxy, keyword, None)
    if "SpecificCharacterSet" in proxy:  # highdicom checks it against its list; set after
        del proxy.SpecificCharacterSet
    return proxy


def _copy_patient_and_study(target: hd.SOPClass, source: Dataset) -> None:
    """Copy the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
    Study modules from ``source`` (by highdicom's module tables for the source's IOD)."""
    try:
        target.copy_patient_and_study_information(source)
    except KeyError:  # a SOP class highdicom does not know: read it with the DX IOD's tables
        proxy = Dataset()
        proxy.update(source)
        proxy.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        target.copy_patient_and_study_information(proxy)
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def _read_headers(instances: Sequence[InstanceOutcome]) -> dict[str, Dataset]:
    headers: dict[str, Dataset] = {}
    for instance in instances:
        try:
            headers[instance.sop_instance_uid] = dcmread(instance.path, stop_before_pixels=True)
        except (OSError, ValueError) as exc:
            logger.warning(
                "stored instance unreadable",
                extra={"sop_instance_uid": instance.sop_instance_uid, "error": type(exc).__name__},
            )
    return headers


def _write(ds: hd.SOPClass, kind: str, out_dir: Path) -> ResultObject:
    """Write atomically (temp file, fsync, rename): a crash never leaves half an object."""
    uid = str(ds.SOPInstanceUID)
    path = out_dir / f"{uid}.dcm"
    tmp = path.with_suffix(".dcm.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return ResultObject(kind=kind, sop_instance_uid=uid, path=path)  # type: ignore[arg-type]


def _num(value: float) -> float:
    return round(float(value), 6)


def _positive(flag: bool) -> Code:
    return codes.SCT.Positive if flag else codes.SCT.Negative
