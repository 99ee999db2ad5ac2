"""Build realistic CR/DX/SC DICOM datasets from the shared NIH PNGs, for tests.

The datasets look like what a modality or PACS sends: Patient module (FAKE values only),
General Study, General Series, General Equipment, SOP Common, General Image, Image Pixel,
DX/CR attributes (ViewPosition, BodyPartExamined, PresentationIntentType, ImageType) and a VOI
window. Everything can be overridden by DICOM keyword.

API
---
``nih_pngs(data_dir) -> list[Path]``
    The 1024 px NIH PNGs of the shared data folder (``data_dir`` as the ``data_dir`` fixture
    gives it), sorted.
``png_gray(path) -> np.ndarray``
    A PNG as uint8 grayscale, exactly as :func:`app.imaging.decode.decode_image` reads it
    (x 255), so a DICOM built from it can be compared with the PNG.
``make_dataset(source, **options) -> Dataset``
    ``source`` is a PNG path or a 2-D uint8/uint16 array. Options (all keyword-only):

    - ``modality`` ("DX"): sets Modality and, unless ``sop_class`` is given, the SOP class
      (DX -> Digital X-Ray For Presentation, CR -> Computed Radiography, CT -> CT Image, MR -> MR
      Image, anything else -> Secondary Capture);
    - ``sop_class``, ``study_uid``, ``series_uid``, ``sop_uid`` (generated when None),
      ``instance_number`` (1), ``series_number`` (1);
    - ``view_position`` ("PA"), ``body_part`` ("CHEST"), ``presentation_intent``
      ("FOR PRESENTATION" for DX, absent otherwise), ``image_type`` (("ORIGINAL", "PRIMARY"));
      pass None to leave an attribute out;
    - ``bits_stored`` (12): 8-bit sources are spread to the full stored range
      (``v * (2**bits - 1) / 255``, rounded), so a window over that range shows the PNG again;
    - ``photometric`` ("MONOCHROME2"); with an 8-bit source "MONOCHROME1" stores inverted
      values, so the displayed image is still the PNG (other arrays are stored as given);
    - ``window`` ((center, width) covering the stored range, i.e. the PNG), or None for none;
    - ``patient_name``, ``patient_id``, ``birth_date``, ``sex``, ``accession``: FAKE defaults;
    - ``**attributes``: any other DICOM keyword set last (None deletes it), e.g.
      ``PixelPaddingValue=65535`` or ``PresentationLUTShape="INVERSE"``.

    The file meta says Explicit VR Little Endian; :func:`to_bytes` changes that.
``to_bytes(ds, transfer_syntax=None) -> bytes``
    A DICOM Part 10 file. ``transfer_syntax`` (a UID) re-encodes: Implicit/Explicit VR Little
    Endian, Deflated, or any syntax pydicom can compress to (RLE Lossless, JPEG-LS, JPEG 2000).
    The dataset passed in is not modified.
``make_study(sources, views=("PA", "LL"), **options) -> list[Dataset]``
    One study (same patient, StudyInstanceUID and AccessionNumber), one series per instance,
    each with its own ViewPosition: ``make_study([png_a, png_b], views=("PA", "LL"))`` is a PA
    and a lateral. ``options`` go to every :func:`make_dataset` call.

Nothing here touches the service; it only writes what pydicom writes.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"

_SOP_FOR_MODALITY = {"DX": DX_FOR_PRESENTATION, "CR": CR_IMAGE, "CT": CT_IMAGE, "MR": MR_IMAGE}

FAKE_PATIENT_NAME = "FAKE^PATIENT^TESTONLY"
FAKE_PATIENT_ID = "FAKEPID0001"
FAKE_BIRTH_DATE = "19700101"
FAKE_ACCESSION = "FAKEACC0001"
_UNSET: Any = object()


def nih_pngs(data_dir: Path) -> list[Path]:
    """The shared 1024 px NIH PNGs, sorted."""
    return sorted((Path(data_dir) / "nih" / "images" / "nih-1024").glob("*.png"))


def png_gray(path: Path | str) -> np.ndarray:
    """uint8 luminance of a PNG, as the service's decoder reads it (Pillow ``L``)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L") if im.mode != "L" else im.copy())


def stored_values(gray: np.ndarray, bits_stored: int) -> np.ndarray:
    """8-bit gray spread to ``bits_stored`` (v * (2**bits - 1) / 255, rounded); other arrays
    (uint16, int16 for signed data) are returned as they are."""
    if gray.dtype != np.uint8:
        return gray
    if bits_stored == 8:
        return gray.copy()
    top = (1 << bits_stored) - 1
    return np.rint(gray.astype(np.float64) * (top / 255.0)).astype(np.uint16)


def make_dataset(
    source: Path | str | np.ndarray,
    *,
    modality: str = "DX",
    sop_class: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    presentation_intent: str | None = _UNSET,
    image_type: Sequence[str] | None = ("ORIGINAL", "PRIMARY"),
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = _UNSET,
    patient_name: str = FAKE_PATIENT_NAME,
    patient_id: str = FAKE_PATIENT_ID,
    birth_date: str = FAKE_BIRTH_DATE,
    sex: str = "O",
    accession: str = FAKE_ACCESSION,
    **attributes: Any,
) -> Dataset:
    """A realistic single-frame projection radiograph dataset; see the module docstring."""
    gray = png_gray(source) if isinstance(source, (str, Path)) else np.asarray(source)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale source, got shape {gray.shape}")
    values = stored_values(gray, bits_stored)
    top = (1 << bits_stored) - 1
    if photometric == "MONOCHROME1" and gray.dtype == np.uint8:
        values = (top - values.astype(np.int64)).astype(values.dtype)
    sop_class = sop_class or _SOP_FOR_MODALITY.get(modality, SECONDARY_CAPTURE)
    sop_uid = sop_uid or generate_uid()

    ds = Dataset()
    # Patient module: FAKE values, so tests can prove none of them leaks.
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    # General Study
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "093000"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "FAKE^REFERRER"
    ds.StudyID = "1"
    ds.StudyDescription = "XR CHEST"
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    if presentation_intent is _UNSET:
        presentation_intent = "FOR PRESENTATION" if modality == "DX" else None
    if presentation_intent is not None:
        ds.PresentationIntentType = presentation_intent
    # General Equipment
    ds.Manufacturer = "cxr-triage test factory"
    ds.InstitutionName = "FAKE HOSPITAL"
    # SOP Common, General Image
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.ContentDate = "20260101"
    ds.ContentTime = "093000"
    if image_type is not None:
        ds.ImageType = list(image_type)
    ds.PatientOrientation = ["L", "F"] if view_position == "AP" else ["R", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [0.143, 0.143]
    # Image Pixel: set_pixel_data fills Rows/Columns/Bits*/PixelRepresentation consistently.
    ds.set_pixel_data(
        np.ascontiguousarray(values),
        photometric_interpretation=photometric,
        bits_stored=bits_stored,
        generate_instance_uid=False,
    )
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    if modality in ("DX", "CR"):
        ds.RescaleType = "US"
    if window is _UNSET:
        window = ((top + 1) / 2, top + 1)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def to_bytes(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """``ds`` as a Part 10 file, re-encoded to ``transfer_syntax`` when given."""
    ds = copy.deepcopy(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = meta.get("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    tsyntax = UID(transfer_syntax or meta.TransferSyntaxUID)
    if tsyntax.is_compressed and tsyntax != DeflatedExplicitVRLittleEndian:
        ds.compress(tsyntax, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = tsyntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_study(
    sources: Iterable[Path | str | np.ndarray],
    views: Sequence[str | None] = ("PA", "LL"),
    **options: Any,
) -> list[Dataset]:
    """One study, one instance per source, each in its own series with ``views[i]``."""
    study_uid = options.pop("study_uid", None) or generate_uid()
    out = []
    for number, (source, view) in enumerate(zip(sources, views, strict=True), start=1):
        out.append(
            make_dataset(
                source,
                study_uid=study_uid,
                view_position=view,
                instance_number=1,
                series_number=number,
                **options,
            )
        )
    return out
