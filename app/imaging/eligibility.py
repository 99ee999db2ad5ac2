"""Is this DICOM a frontal chest radiograph? The gate before anything is scored.

The model was trained on frontal (PA/AP) chest radiographs only; a probability for a lateral, a
knee or a CT slice is meaningless and, as a triage flag, unsafe. This module reads the header
(never the pixels, so it works on a dataset read with ``stop_before_pixels=True``) and never
guesses: an attribute that is present and names something else is a :class:`Refusal`; an
attribute that is absent is only a warning (many real modalities leave Type 2/3 attributes
empty). ``POST /predict`` and the PACS receiver both call :func:`check_eligibility`; the rules
are listed in docs/serving.md ("Eligibility").

Only coded values (CS, UID) are ever quoted back, and only when they look like one, so no
patient field can leak through a refusal reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MF_GRAYSCALE_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"

#: SOP classes whose instances can hold a chest radiograph this model scores.
ACCEPTED_SOP_CLASSES = frozenset(
    {
        CR_IMAGE,
        DX_FOR_PRESENTATION,
        SECONDARY_CAPTURE,
        MF_GRAYSCALE_BYTE_SC,
        MF_GRAYSCALE_WORD_SC,
    }
)
_SECONDARY_CAPTURE_CLASSES = frozenset(
    {SECONDARY_CAPTURE, MF_GRAYSCALE_BYTE_SC, MF_GRAYSCALE_WORD_SC}
)
#: Projection radiography: computed, digital, and digitised film (RG).
ACCEPTED_MODALITIES = frozenset({"CR", "DX", "RG"})
#: Frontal projections (PS3.3 C.8.11.5 / CR series ViewPosition defined terms).
FRONTAL_VIEWS = frozenset({"PA", "AP"})
#: Words a non-standard ViewPosition may add to PA/AP without leaving the frontal view
#: (``AP SUPINE``, ``PA_ERECT``).
_POSITION_WORDS = frozenset({"FRONTAL", "PORTABLE", "PORT", "ERECT", "UPRIGHT", "SUPINE"})
#: Words that name the chest in BodyPartExamined (PS3.16 Annex L uses CHEST; THORAX, LUNG and
#: localised spellings are what modalities actually write).
CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "TORACE", "PECHO", "CXR"})
#: Words that may accompany a chest word without naming another region (``CHEST PA``).
_FRONTAL_WORDS = FRONTAL_VIEWS | _POSITION_WORDS
#: SNOMED CT / SRT codes of the chest, thorax and lung (CID 4031 Common Anatomic Regions).
CHEST_CODES = frozenset({"43799004", "51185008", "39607008", "T-D3000", "T-28000"})
#: ImageType values that mark an image that is not a diagnostic projection radiograph.
REFUSED_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT"})

_CODE_STRING = re.compile(r"[A-Z0-9 _\-]{1,16}")
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True, slots=True)
class Refusal:
    """One attribute that makes an image ineligible, e.g. ``ViewPosition`` ``LL``."""

    attribute: str
    value: str
    reason: str  # e.g. "ViewPosition LL is not frontal"


@dataclass(frozen=True, slots=True)
class Eligibility:
    """What the header says: refusals (ineligible) and warnings (could not confirm)."""

    refusals: tuple[Refusal, ...]
    warnings: tuple[str, ...]

    @property
    def eligible(self) -> bool:
        return not self.refusals

    @property
    def reason(self) -> str:
        """All refusal reasons in one line ("" when eligible)."""
        return "; ".join(r.reason for r in self.refusals)


def check_eligibility(ds: pydicom.Dataset) -> Eligibility:
    """Apply DESIGN.md's eligibility rules to a dataset's header; never raises on bad values."""
    refusals: list[Refusal] = []
    warnings: list[str] = []
    sop_class = _sop_class(ds)
    _check_modality(ds, sop_class, refusals, warnings)
    _check_sop_class(sop_class, refusals)
    _check_presentation_intent(ds, refusals)
    _check_body_part(ds, refusals, warnings)
    _check_view(ds, refusals, warnings)
    _check_image_type(ds, refusals)
    return Eligibility(tuple(refusals), tuple(warnings))


# --------------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    """A top-level string value, stripped and upper-cased; "" when absent, empty or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element that pydicom cannot convert
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().strip("\x00").strip().upper()


def echo(value: str) -> str:
    """A coded value fit to quote in a reason: CS-like text, else a placeholder."""
    if not value:
        return "(empty)"
    return value if _CODE_STRING.fullmatch(value) else "(non-standard value)"


def _sop_class(ds: Dataset) -> str:
    sop = _text(ds, "SOPClassUID")
    if not sop:
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            sop = _text(meta, "MediaStorageSOPClassUID")
    return sop


def _sop_label(sop: str) -> tuple[str, str]:
    """(value to quote, readable name) of a SOP Class UID."""
    if not _UID_PATTERN.fullmatch(sop) or len(sop) > 64:
        return "(invalid UID)", "(invalid UID)"
    name = UID(sop).name
    return sop, (f"{name} ({sop})" if name != sop else sop)


def _check_sop_class(sop: str, refusals: list[Refusal]) -> None:
    if not sop or sop in ACCEPTED_SOP_CLASSES:
        return  # absence is covered by the Modality check's warning
    value, name = _sop_label(sop)
    if sop == DX_FOR_PROCESSING:
        reason = f"SOPClassUID {name} is raw detector data, not an image for presentation"
    else:
        reason = f"SOPClassUID {name} is not a radiograph storage class (CR, DX, SC)"
    refusals.append(Refusal("SOPClassUID", value, reason))


def _check_modality(ds: Dataset, sop: str, refusals: list[Refusal], warnings: list[str]) -> None:
    modality = _text(ds, "Modality")
    if not modality:
        if sop not in (CR_IMAGE, DX_FOR_PRESENTATION):
            warnings.append("Modality is absent: could not confirm a radiograph (CR, DX)")
        return
    if modality in ACCEPTED_MODALITIES:
        return
    if modality == "OT" and sop in _SECONDARY_CAPTURE_CLASSES:
        warnings.append(
            "Modality OT (other) on a Secondary Capture: could not confirm a radiograph"
        )
        return
    value = echo(modality)
    refusals.append(
        Refusal("Modality", value, f"Modality {value} is not a projection radiograph (CR, DX)")
    )


def _check_presentation_intent(ds: Dataset, refusals: list[Refusal]) -> None:
    intent = " ".join(_text(ds, "PresentationIntentType").split())
    if intent == "FOR PROCESSING":
        refusals.append(
            Refusal(
                "PresentationIntentType",
                intent,
                "PresentationIntentType FOR PROCESSING is raw detector data, not an image for "
                "presentation",
            )
        )


def _check_body_part(ds: Dataset, refusals: list[Refusal], warnings: list[str]) -> None:
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        words = _words(body_part)
        if any(w in CHEST_WORDS for w in words) and all(
            w in CHEST_WORDS or w in _FRONTAL_WORDS for w in words
        ):
            return
        value = echo(body_part)
        refusals.append(
            Refusal("BodyPartExamined", value, f"BodyPartExamined {value} is not the chest")
        )
        return
    region = _first_code(ds, "AnatomicRegionSequence")
    if region is None:
        warnings.append("BodyPartExamined is absent: could not confirm a chest image")
        return
    code, meaning = region
    if code in CHEST_CODES or any(w in meaning.upper() for w in ("CHEST", "THORAX", "LUNG")):
        return
    value = echo(code)
    refusals.append(
        Refusal("AnatomicRegionSequence", value, f"AnatomicRegionSequence {value} is not the chest")
    )


def _check_view(ds: Dataset, refusals: list[Refusal], warnings: list[str]) -> None:
    view = _text(ds, "ViewPosition")
    if view:
        words = _words(view)
        frontal = any(w in FRONTAL_VIEWS for w in words) and all(
            w in FRONTAL_VIEWS or w in _POSITION_WORDS for w in words
        )
        if not frontal:
            value = echo(view)
            refusals.append(Refusal("ViewPosition", value, f"ViewPosition {value} is not frontal"))
        return
    code = _first_code(ds, "ViewCodeSequence")
    if code is None:
        warnings.append("ViewPosition is absent: could not confirm a frontal (PA/AP) view")
        return
    meaning = re.sub(r"[^a-z]", "", code[1].lower())
    if meaning in ("posteroanterior", "anteroposterior"):
        return
    if any(w in meaning for w in ("lateral", "oblique", "decubitus", "axial", "lordotic")):
        value = echo(code[0])
        refusals.append(
            Refusal("ViewCodeSequence", value, f"ViewCodeSequence {value} is not frontal")
        )
        return
    warnings.append("ViewCodeSequence names an unrecognised view: could not confirm a frontal view")


def _check_image_type(ds: Dataset, refusals: list[Refusal]) -> None:
    values = {v.strip() for v in _text(ds, "ImageType").split("\\")}
    for refused in sorted(values & REFUSED_IMAGE_TYPES):
        refusals.append(
            Refusal(
                "ImageType",
                refused,
                f"ImageType {refused} is a localizer, not a diagnostic radiograph",
            )
        )


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-/,.]+", value) if w]


def _first_code(ds: Dataset, keyword: str) -> tuple[str, str] | None:
    """(CodeValue, CodeMeaning) of a code sequence's first item, upper-cased value."""
    try:
        seq = ds.get(keyword)
        if not seq:
            return None
        item = seq[0]
        code = _text(item, "CodeValue") or _text(item, "LongCodeValue")
        meaning = str(item.get("CodeMeaning", "") or "")
    except Exception:
        return None
    if not code and not meaning:
        return None
    return code, meaning
