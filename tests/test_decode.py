"""Decoding and preprocessing on the shared real images and DICOMs, their re-encodings, and
hostile bytes. Pixel-level checks are stricter than the acceptance's "scores within 0.02"."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import (
    apply_modality_lut,
    apply_voi_lut,
    apply_windowing,
    get_encoder,
)
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from app.card import InputSpec, ModelCard
from app.imaging.decode import DecodedImage, DecodeError, apply_window, decode_image
from app.imaging.preprocess import fit_gray, resize_gray, to_model_input
from app.settings import DEFAULT_MODEL_DIR
from tests import dicom_factory as factory

BROKEN_DICOMS = {"pylibjpegdata__966.dcm", "pylibjpegdata__RG2_JPLY.dcm"}
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "SECRET-4711"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _decode_file(path: Path, **kwargs: object) -> DecodedImage:
    return decode_image(path.read_bytes(), **kwargs)  # type: ignore[arg-type]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _assert_unit_gray(pixels: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert pixels.dtype == np.float32
    assert pixels.ndim == 2
    if shape is not None:
        assert pixels.shape == shape
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0.0
    assert pixels.max() <= 1.0


@pytest.fixture(scope="module")
def nih_rows(nih_dir: Path) -> list[dict[str, str]]:
    with (nih_dir / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reference_png(nih_dir: Path) -> Path:
    """A real 1024 px 8-bit grayscale NIH image that spans the full 0..255 range."""
    return nih_dir / "images" / "nih-1024" / "00000075_000.png"


@pytest.fixture(scope="module")
def reference_u8(reference_png: Path) -> np.ndarray:
    arr = np.asarray(Image.open(reference_png))
    assert arr.dtype == np.uint8 and arr.ndim == 2
    assert (arr.min(), arr.max()) == (0, 255)
    return arr


# ------------------------------------------------------------------------------------------
# PNG / JPEG


@pytest.mark.parametrize("subset", ["nih-1024", "nih-256", "nih-64", "misc"])
def test_every_nih_png_decodes(nih_dir: Path, nih_rows: list[dict[str, str]], subset: str) -> None:
    rows = [row for row in nih_rows if row["subset"] == subset]
    assert rows, f"labels.csv lists no {subset} images"
    for row in rows:
        decoded = _decode_file(nih_dir / row["file"], content_type="image/png")
        assert decoded.source == "png"
        assert decoded.dicom is None
        assert decoded.warnings == ()
        _assert_unit_gray(decoded.pixels, (int(row["height"]), int(row["width"])))
        assert decoded.pixels.max() > decoded.pixels.min(), row["file"]


def test_colour_pngs_with_equal_channels_equal_their_gray_decode(
    nih_dir: Path, nih_rows: list[dict[str, str]]
) -> None:
    """RGBA (alpha ignored) and RGB NIH files hold R=G=B: luminance must be that channel."""
    colour = [row for row in nih_rows if row["mode"] in ("RGBA", "RGB")]
    by_mode = {mode: [r for r in colour if r["mode"] == mode] for mode in ("RGBA", "RGB")}
    assert any(r["subset"] == "nih-1024" for r in by_mode["RGBA"])
    checked = [r for r in by_mode["RGBA"]] + by_mode["RGB"][::25]
    for row in checked:
        arr = np.asarray(Image.open(nih_dir / row["file"]))
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        gray = Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L")
        expected = decode_image(_png_bytes(gray)).pixels
        got = _decode_file(nih_dir / row["file"]).pixels
        np.testing.assert_array_equal(got, expected, err_msg=row["file"])
        np.testing.assert_allclose(got, arr[..., 0] / 255.0, atol=1e-7)


def test_alpha_is_ignored(reference_u8: np.ndarray) -> None:
    reference_u8 = reference_u8[256:512, 256:512]  # random alpha makes big PNGs slow to write
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, reference_u8.shape, dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(reference_u8), Image.fromarray(alpha)])
    rgba = Image.merge("RGBA", [Image.fromarray(reference_u8)] * 3 + [Image.fromarray(alpha)])
    for image in (la, rgba):
        np.testing.assert_allclose(
            decode_image(_png_bytes(image)).pixels, reference_u8 / 255.0, atol=1e-7
        )


def test_palette_and_bilevel_pngs(reference_u8: np.ndarray) -> None:
    palette = Image.fromarray(reference_u8, mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.frombytes(reference_u8.tobytes())
    np.testing.assert_allclose(
        decode_image(_png_bytes(palette)).pixels, reference_u8 / 255.0, atol=1e-7
    )
    bilevel = Image.fromarray(reference_u8 > 127)
    assert bilevel.mode == "1"
    np.testing.assert_array_equal(decode_image(_png_bytes(bilevel)).pixels, reference_u8 > 127)


def test_16_bit_png_scales_by_its_bit_depth(reference_u8: np.ndarray) -> None:
    wide = reference_u8.astype(np.uint16) * 257  # 0..255 -> 0..65535
    data = _png_bytes(Image.fromarray(wide))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded = decode_image(data, content_type="image/png")
    _assert_unit_gray(decoded.pixels, reference_u8.shape)
    np.testing.assert_allclose(decoded.pixels, reference_u8 / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_decodes_close_to_the_png(reference_u8: np.ndarray, mode: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(reference_u8).convert(mode).save(buf, format="JPEG", quality=95)
    decoded = decode_image(buf.getvalue(), content_type="image/jpeg")
    assert decoded.source == "jpeg" and decoded.warnings == ()
    _assert_unit_gray(decoded.pixels, reference_u8.shape)
    diff = np.abs(decoded.pixels - reference_u8 / 255.0)
    assert diff.mean() < 0.01 and np.quantile(diff, 0.999) < 0.05


def test_jpeg_exif_orientation_is_applied(reference_u8: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    buf = io.BytesIO()
    Image.fromarray(reference_u8[:, :512]).save(buf, format="JPEG", quality=95, exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.pixels.shape == (512, 1024)
    assert any("EXIF orientation" in w for w in decoded.warnings)


def test_declared_type_is_only_a_hint(reference_png: Path) -> None:
    decoded = _decode_file(reference_png, content_type="application/dicom")
    assert decoded.source == "png"
    assert decoded.warnings == (
        "declared as application/dicom but the bytes are PNG; decoded as such",
    )
    neutral = _decode_file(reference_png, content_type="application/octet-stream; x=1")
    assert neutral.warnings == ()


# ------------------------------------------------------------------------------------------
# Shared real DICOMs


def _dicom_files(dicom_dir: Path) -> list[Path]:
    files = sorted(dicom_dir.glob("*/*.dcm"))
    assert len(files) == 13
    return files


@pytest.fixture(scope="module")
def shared_dicoms(dicom_dir: Path) -> dict[str, DecodedImage]:
    """Every decodable shared DICOM, decoded once: "chest/NAME.dcm" -> result."""
    return {
        f"{path.parent.name}/{path.name}": _decode_file(path, content_type="application/dicom")
        for path in _dicom_files(dicom_dir)
        if path.name not in BROKEN_DICOMS
    }


def test_every_shared_dicom_decodes_except_the_broken_ones(
    dicom_dir: Path, shared_dicoms: dict[str, DecodedImage]
) -> None:
    assert len(shared_dicoms) == 11
    for name, decoded in shared_dicoms.items():
        ds = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
        assert decoded.source == "dicom"
        _assert_unit_gray(decoded.pixels, (ds.Rows, ds.Columns))
        assert decoded.pixels.std() > 0.05, name
        assert decoded.dicom is not None
        assert decoded.dicom.study_instance_uid == ds.StudyInstanceUID
        assert decoded.dicom.series_instance_uid == ds.SeriesInstanceUID
        assert decoded.dicom.sop_instance_uid == ds.SOPInstanceUID
        text = " ".join(decoded.warnings) + repr(decoded.dicom)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "")
            assert not value or value not in text, f"{keyword} leaked for {name}"


@pytest.mark.parametrize("name", sorted(BROKEN_DICOMS))
def test_broken_dicom_streams_get_a_422_naming_the_transfer_syntax(
    dicom_dir: Path, name: str
) -> None:
    path = next(dicom_dir.glob(f"*/{name}"))
    tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    with pytest.raises(DecodeError) as info:
        _decode_file(path)
    assert info.value.status == 422
    assert tsyntax.name in info.value.detail and str(tsyntax) in info.value.detail


def test_monochrome1_fake_is_the_inverted_siim_image(
    shared_dicoms: dict[str, DecodedImage],
) -> None:
    siim = next(v for k, v in shared_dicoms.items() if k.startswith("chest/torchxrayvision__siim"))
    fake = shared_dicoms["chest/torchxrayvision__Fake_MONOHR1.dcm"]
    np.testing.assert_array_equal(fake.pixels, 1.0 - siim.pixels)
    assert abs(float(siim.pixels.mean()) - (1 - float(fake.pixels.mean()))) < 1e-6


@pytest.mark.parametrize(
    ("compressed", "reference", "atol"),
    [
        ("chest/pydicomdata__RG1_J2KR.dcm", "chest/pydicomdata__RG1_UNCR.dcm", 0.0),
        ("chest/pydicomdata__RG1_J2KI.dcm", "chest/pydicomdata__RG1_UNCI.dcm", 0.0),
        ("nonchest/pylibjpegdata__RG2_JLSL.dcm", "nonchest/pylibjpegdata__RG2_JPLL.dcm", 0.0),
        ("nonchest/pydicomdata__RG3_J2KI.dcm", "nonchest/pydicomdata__RG3_J2KR.dcm", 0.02),
    ],
)
def test_real_transfer_syntaxes_agree_on_the_same_image(
    shared_dicoms: dict[str, DecodedImage], compressed: str, reference: str, atol: float
) -> None:
    got = shared_dicoms[compressed].pixels
    want = shared_dicoms[reference].pixels
    if atol == 0.0:
        np.testing.assert_array_equal(got, want)
    else:
        assert np.abs(got - want).mean() < atol


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_apply_window_matches_pydicom(dicom_dir: Path, function: str) -> None:
    ds = pydicom.dcmread(dicom_dir / "nonchest" / "pylibjpegdata__RG2_JPLL.dcm")
    raw = ds.pixel_array
    ds.VOILUTFunction = function
    ds.WindowCenter = [300.0, 511.0]
    ds.WindowWidth = [400.0, 1024.0]
    y_max = 2**ds.BitsStored - 1
    want = apply_windowing(raw, ds) / y_max  # pydicom maps to [0, 2**BitsStored - 1]
    got = apply_window(raw.astype(np.float32), 300.0, 400.0, function)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert 0.0 < float(got.mean()) < 1.0


def test_apply_window_width_one_is_a_threshold() -> None:
    x = np.array([99.0, 99.5, 100.0, 101.0], dtype=np.float32)
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 8, 0
    ds.WindowCenter, ds.WindowWidth = 100.0, 1.0
    np.testing.assert_array_equal(apply_window(x, 100.0, 1.0), apply_windowing(x, ds) / 255)


# ------------------------------------------------------------------------------------------
# DICOM re-encodings of one real NIH image: every path must land on the PNG's pixels


def _dataset(
    stored: np.ndarray,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    **attrs: object,
) -> Dataset:
    """A CR image dataset around ``stored`` with patient fields that must never surface."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def _write(ds: Dataset, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def _part10(ds: Dataset, tsyntax: str = ExplicitVRLittleEndian) -> bytes:
    if tsyntax in (RLELossless, JPEG2000Lossless, JPEG2000, JPEGLSLossless):
        encoder = get_encoder(tsyntax)
        if not encoder.is_available and tsyntax == JPEGLSLossless:
            pytest.skip(f"no JPEG-LS encoder (pyjpegls, optional): {encoder.missing_dependencies}")
        if not encoder.is_available:
            pytest.fail(
                f"pydicom has no usable {tsyntax.name} encoder: {encoder.missing_dependencies}"
            )
        kwargs = {"j2k_cr": [15]} if tsyntax == JPEG2000 else {}
        ds.compress(tsyntax, **kwargs)
    else:
        ds.file_meta.TransferSyntaxUID = tsyntax
    return _write(ds, enforce_file_format=True)


def _raw(ds: Dataset, *, implicit: bool) -> bytes:
    """A bare dataset: no preamble, no "DICM", no file meta."""
    del ds.file_meta
    return _write(ds, implicit_vr=implicit, little_endian=True)


def _meta_without_preamble(ds: Dataset) -> bytes:
    return _part10(ds)[128 + 4 :]


def _12bit(u8: np.ndarray) -> np.ndarray:
    return np.round(u8.astype(np.float64) * 4095 / 255).astype(np.uint16)


# Each variant: (stored pixels from the 8-bit PNG, dataset attributes, tolerance vs PNG/255).
# The windows are chosen so that the display mapping returns exactly the PNG's scale.
VARIANTS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, dict[str, object], float]]] = {
    "8-bit window": lambda u8: (
        u8,
        {"bits_stored": 8, "WindowCenter": 128, "WindowWidth": 256},
        1e-6,
    ),
    "12-bit window": lambda u8: (
        _12bit(u8),
        {"bits_stored": 12, "WindowCenter": 2048, "WindowWidth": 4096},
        2e-4,
    ),
    "16-bit window": lambda u8: (
        u8.astype(np.uint16) * 257,
        {"bits_stored": 16, "WindowCenter": 32768, "WindowWidth": 65536},
        1e-6,
    ),
    "12-bit MONOCHROME1": lambda u8: (
        4095 - _12bit(u8),
        {
            "bits_stored": 12,
            "photometric": "MONOCHROME1",
            "WindowCenter": 2048,
            "WindowWidth": 4096,
        },
        2e-4,
    ),
    "12-bit rescale slope/intercept": lambda u8: (
        _12bit(u8),
        {
            "bits_stored": 12,
            "RescaleSlope": 0.5,
            "RescaleIntercept": -1024,
            "WindowCenter": 0.25,  # in rescaled units: (0.5 * s - 1024) -> s / 4095
            "WindowWidth": 2048.5,
        },
        2e-4,
    ),
    "16-bit signed": lambda u8: (
        (_12bit(u8).astype(np.int32) - 2048).astype(np.int16),
        {"bits_stored": 16, "signed": True, "WindowCenter": 0, "WindowWidth": 4096},
        2e-4,
    ),
    "two windows, first one used": lambda u8: (
        _12bit(u8),
        {"bits_stored": 12, "WindowCenter": [2048, 1000], "WindowWidth": [4096, 500]},
        2e-4,
    ),
    "LINEAR_EXACT window": lambda u8: (
        _12bit(u8),
        {
            "bits_stored": 12,
            "VOILUTFunction": "LINEAR_EXACT",
            "WindowCenter": 2047.5,
            "WindowWidth": 4095,
        },
        2e-4,
    ),
    "VOI LUT sequence": lambda u8: (
        _12bit(u8),
        {"bits_stored": 12, "VOILUTSequence": _lut_sequence(4096, 0, lambda i: i / 4095)},
        2e-4,
    ),
    "VOI LUT after rescale": lambda u8: (
        _12bit(u8),  # modality value m = 2 s + 100 indexes the LUT from its first map, 100
        {
            "bits_stored": 12,
            "RescaleSlope": 2,
            "RescaleIntercept": 100,
            "VOILUTSequence": _lut_sequence(8191, 100, lambda i: i / 8190),
        },
        2e-4,
    ),
    "Modality LUT sequence": lambda u8: (
        _12bit(u8),  # the LUT doubles s; the window maps 0..8190 back to [0, 1]
        {
            "bits_stored": 12,
            "ModalityLUTSequence": _lut_sequence(4096, 0, lambda i: 2 * i / 65535, "US"),
            "WindowCenter": 4095.5,
            "WindowWidth": 8191,
        },
        2e-4,
    ),
}


def _lut_sequence(
    entries: int, first_map: int, fraction: Callable[[int], float], modality_type: str = ""
) -> list[Dataset]:
    """A one-item LUT sequence whose 16-bit entries are ``fraction(index)`` of 65535."""
    item = Dataset()
    item.LUTDescriptor = [entries, first_map, 16]
    item.LUTData = [round(fraction(i) * 65535) for i in range(entries)]
    item["LUTData"].VR = "US"
    if modality_type:
        item.ModalityLUTType = modality_type
    return [item]


ENCODINGS: dict[str, Callable[[Dataset], bytes]] = {
    "explicit VR LE": _part10,
    "implicit VR LE": lambda ds: _part10(ds, ImplicitVRLittleEndian),
    "deflated explicit VR LE": lambda ds: _part10(ds, DeflatedExplicitVRLittleEndian),
    "RLE lossless": lambda ds: _part10(ds, RLELossless),
    "JPEG 2000 lossless": lambda ds: _part10(ds, JPEG2000Lossless),
    "JPEG-LS lossless": lambda ds: _part10(ds, JPEGLSLossless),
    "raw implicit, no preamble/meta": lambda ds: _raw(ds, implicit=True),
    "raw explicit, no preamble/meta": lambda ds: _raw(ds, implicit=False),
    "file meta, no preamble": _meta_without_preamble,
}


def _assert_matches_png(data: bytes, u8: np.ndarray, tol: float) -> DecodedImage:
    decoded = decode_image(data, content_type="application/dicom")
    assert decoded.source == "dicom"
    _assert_unit_gray(decoded.pixels, u8.shape)
    np.testing.assert_allclose(decoded.pixels, u8 / 255.0, atol=tol, rtol=0)
    text = " ".join(decoded.warnings) + repr(decoded)
    assert PATIENT_NAME not in text and PATIENT_ID not in text
    return decoded


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dicom_display_variants_match_the_png(reference_u8: np.ndarray, variant: str) -> None:
    stored, attrs, tol = VARIANTS[variant](reference_u8)
    ds = _dataset(stored, **attrs)  # type: ignore[arg-type]
    if variant == "VOI LUT sequence":
        # A wrong window beside the LUT: the LUT must win, as in pydicom's apply_voi_lut.
        ds.WindowCenter, ds.WindowWidth = 100, 50
    decoded = _assert_matches_png(_part10(ds), reference_u8, tol)
    assert decoded.warnings == ()
    assert decoded.dicom is not None
    assert decoded.dicom.sop_instance_uid == ds.SOPInstanceUID
    assert decoded.dicom.study_instance_uid == ds.StudyInstanceUID


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("variant", ["12-bit MONOCHROME1", "12-bit rescale slope/intercept"])
def test_dicom_encodings_match_the_png(
    reference_u8: np.ndarray, encoding: str, variant: str
) -> None:
    stored, attrs, tol = VARIANTS[variant](reference_u8)
    ds = _dataset(stored, **attrs)  # type: ignore[arg-type]
    data = ENCODINGS[encoding](ds)
    decoded = _assert_matches_png(data, reference_u8, tol)
    assert decoded.warnings == ()
    if "raw" not in encoding:
        assert decoded.dicom is not None and decoded.dicom.sop_instance_uid is not None


def test_raw_rle_dataset_without_meta_infers_its_transfer_syntax(reference_u8: np.ndarray) -> None:
    stored, attrs, tol = VARIANTS["12-bit window"](reference_u8)
    ds = _dataset(stored, **attrs)  # type: ignore[arg-type]
    ds.compress(RLELossless)
    _assert_matches_png(_raw(ds, implicit=False), reference_u8, tol)


def test_lossy_dicom_encodings_stay_close_to_the_png(reference_u8: np.ndarray) -> None:
    j2k = _dataset(_12bit(reference_u8), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    buf = io.BytesIO()
    Image.fromarray(reference_u8).save(buf, format="JPEG", quality=95)
    jpeg = _dataset(reference_u8, bits_stored=8, WindowCenter=128, WindowWidth=256)
    jpeg.PixelData = encapsulate([buf.getvalue()])
    jpeg["PixelData"].VR = "OB"
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    for data in (_part10(j2k, JPEG2000), _write(jpeg, enforce_file_format=True)):
        decoded = decode_image(data)
        diff = np.abs(decoded.pixels - reference_u8 / 255.0)
        assert diff.mean() < 0.01 and np.quantile(diff, 0.999) < 0.05


def test_real_jpeg_ls_decodes(dicom_dir: Path, shared_dicoms: dict[str, DecodedImage]) -> None:
    """Re-encoding to JPEG-LS needs pyjpegls (optional, skipped without it in ENCODINGS); the
    real pylibjpegdata__RG2_JLSL.dcm covers decoding either way."""
    path = dicom_dir / "nonchest" / "pylibjpegdata__RG2_JLSL.dcm"
    assert (
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless
    )
    _assert_unit_gray(shared_dicoms["nonchest/" + path.name].pixels, (2140, 1760))


def test_dicom_without_window_uses_its_min_max_range(reference_u8: np.ndarray) -> None:
    stored = _12bit(reference_u8)[:, :512] // 2 + 100  # a narrower range than the bit depth
    decoded = decode_image(_part10(_dataset(stored, bits_stored=12)))
    low, high = float(stored.min()), float(stored.max())
    np.testing.assert_allclose(decoded.pixels, (stored - low) / (high - low), atol=1e-6)
    assert decoded.warnings == (
        "no VOI LUT or window in the DICOM: windowed over the image's own min-max range",
    )


def test_multiframe_dicom_uses_the_first_frame(reference_u8: np.ndarray) -> None:
    frames = np.stack([reference_u8, 255 - reference_u8])
    ds = _dataset(frames[0], bits_stored=8, WindowCenter=128, WindowWidth=256)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    decoded = decode_image(_part10(ds))
    np.testing.assert_allclose(decoded.pixels, reference_u8 / 255.0, atol=1e-6)
    assert decoded.warnings == ("multi-frame DICOM (2 frames); used the first frame",)


def test_colour_dicom_is_rejected(reference_u8: np.ndarray) -> None:
    rgb = np.repeat(reference_u8[:64, :64, None], 3, axis=2)
    ds = _dataset(rgb[..., 0], bits_stored=8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    with pytest.raises(DecodeError) as info:
        decode_image(_part10(ds))
    assert info.value.status == 422 and "colour" in info.value.detail


def test_malformed_uid_is_dropped_without_echoing_it(reference_u8: np.ndarray) -> None:
    ds = _dataset(reference_u8[:64, :64], bits_stored=8, WindowCenter=128, WindowWidth=256)
    ds.StudyInstanceUID = PATIENT_NAME  # a misconfigured sender
    decoded = decode_image(_part10(ds))
    assert decoded.dicom is not None and decoded.dicom.study_instance_uid is None
    assert decoded.warnings == ("ignored a malformed StudyInstanceUID",)


# ------------------------------------------------------------------------------------------
# Hostile bytes


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _status(data: bytes, **kwargs: object) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_empty_upload_is_a_400() -> None:
    assert _status(b"").status == 400


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40), "ZIP"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "GIF"),
        (b'{"image": "not really"}', "text"),
    ],
)
def test_foreign_formats_are_415_naming_what_was_sniffed(data: bytes, named: str) -> None:
    error = _status(data, content_type="image/png")
    assert error.status == 415
    assert named in error.detail and "image/png" in error.detail


def test_random_bytes_are_415() -> None:
    rng = np.random.default_rng(7)
    for size in (1, 7, 131, 4096):
        assert _status(rng.integers(0, 256, size, dtype=np.uint8).tobytes()).status == 415


def test_truncated_images_are_422(reference_png: Path, dicom_dir: Path) -> None:
    png = reference_png.read_bytes()
    assert _status(png[: len(png) // 2]).status == 422
    assert _status(png[:40]).status == 422
    dicom = (dicom_dir / "chest" / "pydicomdata__RG1_UNCR.dcm").read_bytes()
    assert _status(dicom[: len(dicom) // 2]).status == 422
    jpeg = io.BytesIO()
    Image.open(reference_png).save(jpeg, format="JPEG")
    assert _status(jpeg.getvalue()[:5000]).status == 422


def test_decompression_bombs_are_refused_before_decoding(reference_png: Path) -> None:
    bomb = _status(_png_claiming(100_000, 100_000))
    assert bomb.status == 413 and "pixel limit" in bomb.detail
    assert _status(reference_png.read_bytes(), max_pixels=1024 * 1023).status == 413
    sof = b"\xff\xd8\xff\xc0\x00\x0b\x08\xff\xf0\xff\xf0\x01\x01\x11\x00\xff\xd9"
    assert _status(sof).status == 413


def test_dicom_bombs_are_refused(reference_u8: np.ndarray) -> None:
    ds = _dataset(reference_u8[:8, :8], bits_stored=8)
    ds.Rows = ds.Columns = 60_000
    assert _status(_part10(ds)).status == 413
    # 32 MB of pixels deflated to a few dozen KB; with a 1000-pixel limit the inflate cap is
    # 16 MiB + 4 kB, so inflating must stop there rather than reach the Rows/Columns check.
    deflated = _dataset(np.zeros((4000, 4000), np.uint16), bits_stored=12)
    data = _part10(deflated, DeflatedExplicitVRLittleEndian)
    assert len(data) < 100_000
    error = _status(data, max_pixels=1000)
    assert error.status == 413 and "inflates past" in error.detail


def test_element_floods_are_refused_before_pydicom_parses_them(reference_u8: np.ndarray) -> None:
    # Zero bytes read as empty (0000,0000) elements, one every 8 bytes: millions of them would
    # hold a decode worker for seconds. So would a flood of tiny valid elements before the pixels.
    zeros = b"\0" * 128 + b"DICM" + b"\0" * (1 << 20)
    error = _status(zeros)
    assert error.status == 422 and "data elements" in error.detail
    ds = _dataset(reference_u8[:8, :8], bits_stored=8)
    tiny = (struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"LO", 0) for i in range(30_000))
    flood = b"".join(tiny)
    data = _part10(ds)
    pixel_tag = data.index(b"\xe0\x7f\x10\x00")
    error = _status(data[:pixel_tag] + flood + data[pixel_tag:])
    assert error.status == 422 and "data elements" in error.detail
    # A real dataset is well under the budget.
    assert decode_image(data).pixels.shape == (8, 8)


def test_dicom_without_pixel_data_is_422(reference_u8: np.ndarray) -> None:
    ds = _dataset(reference_u8[:8, :8], bits_stored=8)
    del ds.PixelData
    error = _status(_part10(ds))
    assert error.status == 422 and "no pixel data" in error.detail
    assert PATIENT_NAME not in error.detail


def test_codestream_size_must_match_rows_and_columns(reference_u8: np.ndarray) -> None:
    ds = _dataset(reference_u8[:64, :64], bits_stored=8)
    ds.compress(JPEG2000Lossless)
    ds.Rows = 32
    assert _status(_part10(ds)).status == 422


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_raise_only_decode_errors(nih_dir: Path, reference_u8: np.ndarray) -> None:
    """Bit flips and cuts in small real files: a DecodedImage or a 4xx, never anything else."""
    png = next((nih_dir / "images" / "nih-64").glob("*.png")).read_bytes()
    small = reference_u8[::16, ::16]
    dcm = _part10(_dataset(_12bit(small), bits_stored=12, WindowCenter=2048, WindowWidth=4096))
    rle = _part10(_dataset(_12bit(small), bits_stored=12), RLELossless)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG")
    rng = np.random.default_rng(1234)
    for original in (png, dcm, rle, buf.getvalue()):
        for _ in range(60):
            data = bytearray(original)
            for pos in rng.integers(0, len(data), rng.integers(1, 6)):
                data[pos] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(1, len(data)))]
            try:
                decoded = decode_image(bytes(data))
            except DecodeError as exc:
                assert 400 <= exc.status < 500
            else:
                _assert_unit_gray(decoded.pixels)


# ------------------------------------------------------------------------------------------
# Preprocessing


def test_resize_gray_is_pillows_antialiased_float_resize(reference_u8: np.ndarray) -> None:
    pixels = reference_u8 / np.float32(255)
    out = resize_gray(pixels, 224, 224, "bicubic")
    assert out.dtype == np.float32 and out.shape == (224, 224)
    want = np.asarray(Image.fromarray(pixels.astype(np.float32)).resize((224, 224), Image.BICUBIC))
    np.testing.assert_allclose(out, np.clip(want, 0, 1), atol=1e-6)
    np.testing.assert_allclose(resize_gray(reference_u8, 224, 224, "bicubic"), out, atol=1e-6)


def test_resize_gray_antialiases_and_clips() -> None:
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    for interpolation in ("bilinear", "bicubic", "lanczos"):
        small = resize_gray(checker, 64, 64, interpolation)
        assert np.abs(small[4:-4, 4:-4] - 0.5).max() < 0.02, interpolation
    edge = np.zeros((256, 256), np.float32)
    edge[:, 128:] = 1.0
    for interpolation in ("bicubic", "lanczos"):
        out = resize_gray(edge, 100, 100, interpolation)
        assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="unknown interpolation"):
        resize_gray(checker, 8, 8, "cubic-ish")


def test_to_model_input_normalises_per_channel(reference_u8: np.ndarray) -> None:
    spec = InputSpec(height=224, width=192, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = reference_u8 / np.float32(255)
    batch = to_model_input(pixels, spec)
    assert batch.shape == (3, 224, 192) and batch.dtype == np.float32
    gray = resize_gray(pixels, 224, 192, spec.interpolation)
    for channel in range(3):
        expected = (gray - spec.mean[channel]) / spec.std[channel]
        np.testing.assert_allclose(batch[channel], expected, atol=1e-5)


def test_dicom_and_png_give_the_same_model_input(
    reference_png: Path, reference_u8: np.ndarray
) -> None:
    spec = InputSpec(height=224, width=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from_png = to_model_input(_decode_file(reference_png).pixels, spec)
    stored, attrs, _ = VARIANTS["12-bit MONOCHROME1"](reference_u8)
    dcm = _part10(_dataset(stored, **attrs), JPEG2000Lossless)  # type: ignore[arg-type]
    from_dicom = to_model_input(decode_image(dcm).pixels, spec)
    assert np.abs(from_png - from_dicom).max() < 1e-3


# ------------------------------------------------------------------------------------------
# Display rules (DESIGN.md "Image decoding"): DICOMs built with tests/dicom_factory.py from real
# NIH PNGs, each compared with the PNG pixel by pixel, against pydicom's or highdicom's own
# pipeline on the same file, and by the bundled model's scores (within 0.02).

SCORE_IMAGES = (10, 47, 101)  # indices into the sorted 1024 px NIH PNGs, not the reference
BORDER = 96  # px of detector padding around the anatomy
LUT_ENTRIES = 4096


def _lut_item(entries: int = LUT_ENTRIES) -> Dataset:
    """A 12-bit-in, 16-bit-out identity VOI LUT (US data; Implicit VR files read it as OW)."""
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.LUTData = [round(i / (entries - 1) * 65535) for i in range(entries)]
    item["LUTData"].VR = "US"
    return item


def _with_border(gray: np.ndarray, value: float, border: int = BORDER) -> np.ndarray:
    return np.pad(gray, border, constant_values=value)


def _png_of(unit: np.ndarray) -> bytes:
    return _png_bytes(Image.fromarray(np.rint(unit * 255).astype(np.uint8)))


def _png_with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk after IHDR (Pillow does not write one)."""
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body))
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _voi_lut_ow(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    ds = factory.make_dataset(u8, bits_stored=12, window=(100, 50))  # the LUT must win
    ds.VOILUTSequence = [_lut_item()]
    return factory.to_bytes(ds, ImplicitVRLittleEndian), u8 / 255.0


def _padding_min_max(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    anatomy = np.rint(1000 + u8.astype(np.float64) * (2000 / 255)).astype(np.uint16)
    stored = _with_border(anatomy, 65535)
    ds = factory.make_dataset(stored, bits_stored=16, window=None, PixelPaddingValue=65535)
    return factory.to_bytes(ds, ImplicitVRLittleEndian), _with_border(u8 / 255.0, 0.0)


def _padding_beyond_bits_stored(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The issue's case: anatomy in 1000-3000, BitsStored 12, padding written as 65535 (the
    decoded pixels keep 12 bits of it, 4095; the padding value must be read the same way)."""
    anatomy = np.rint(1000 + u8.astype(np.float64) * (2000 / 255)).astype(np.uint16)
    ds = factory.make_dataset(anatomy, bits_stored=12, window=None, PixelPaddingValue=65535)
    stored = _with_border(anatomy, 65535)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    return factory.to_bytes(ds), _with_border(u8 / 255.0, 0.0)


def _padding_range(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    anatomy = np.rint(1000 + u8.astype(np.float64) * (2000 / 255)).astype(np.uint16)
    stored = _with_border(anatomy, 0)
    rng = np.random.default_rng(9)
    frame = np.ones(stored.shape, bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    stored[frame] = rng.integers(60000, 65536, int(frame.sum()))
    ds = factory.make_dataset(
        stored,
        bits_stored=16,
        window=None,
        PixelPaddingValue=60000,
        PixelPaddingRangeLimit=65535,
    )
    return factory.to_bytes(ds), _with_border(u8 / 255.0, 0.0)


def _padding_monochrome1_window(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    """MONOCHROME1 padding at 0 would show white once inverted: it must show darkest."""
    anatomy = np.rint(3000 - u8.astype(np.float64) * (2000 / 255)).astype(np.uint16)
    stored = _with_border(anatomy, 0)
    ds = factory.make_dataset(
        stored, bits_stored=16, photometric="MONOCHROME1", window=(2000.5, 2001)
    )
    ds.PixelPaddingValue = 0
    return factory.to_bytes(ds), _with_border(u8 / 255.0, 0.0)


def _inverse_monochrome2(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    ds = factory.make_dataset(4095 - factory.stored_values(u8, 12), bits_stored=12)
    ds.PresentationLUTShape = "INVERSE"
    return factory.to_bytes(ds), u8 / 255.0


def _inverse_monochrome1(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A conformant MONOCHROME1 DX (PresentationLUTShape INVERSE): inverted once, not twice."""
    ds = factory.make_dataset(u8, bits_stored=12, photometric="MONOCHROME1")
    ds.PresentationLUTShape = "INVERSE"
    return factory.to_bytes(ds), u8 / 255.0


def _functional_groups(
    u8: np.ndarray, *, top_level_window: bool = False
) -> tuple[bytes, np.ndarray]:
    """A multi-frame object whose rescale is in the Shared and whose windows are in the
    Per-frame Functional Groups (frame 2 has a different, wrong-for-frame-1 window)."""
    v12 = factory.stored_values(u8, 12)
    ds = factory.make_dataset(
        u8,
        bits_stored=12,
        sop_class=factory.MF_GRAYSCALE_WORD_SC,
        window=(100, 50) if top_level_window else None,
        RescaleSlope=None,
        RescaleIntercept=None,
        RescaleType=None,
    )
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([v12, 4095 - v12]).astype(np.uint16).tobytes()
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 0.5, -1024, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for center, width in ((0.25, 2048.5), (500.0, 20.0)):  # rescaled units: 0.5 s - 1024
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item = Dataset()
        item.FrameVOILUTSequence = [voi]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    return factory.to_bytes(ds), u8 / 255.0


def _png_16_bit_sbit(u8: np.ndarray) -> tuple[bytes, np.ndarray]:
    """A 12-bit DICOM exported unscaled into a 16-bit PNG, with sBIT 12."""
    png = _png_bytes(Image.fromarray(factory.stored_values(u8, 12)))
    return _png_with_sbit(png, 12), u8 / 255.0


DISPLAY_RULES: dict[str, Callable[[np.ndarray], tuple[bytes, np.ndarray]]] = {
    "VOI LUT with OW LUTData": _voi_lut_ow,
    "PixelPaddingValue out of min-max": _padding_min_max,
    "PixelPaddingRangeLimit": _padding_range,
    "PixelPaddingValue 65535 with BitsStored 12": _padding_beyond_bits_stored,
    "padding darkest (MONOCHROME1, window)": _padding_monochrome1_window,
    "PresentationLUTShape INVERSE on MONOCHROME2": _inverse_monochrome2,
    "MONOCHROME1 with INVERSE, once": _inverse_monochrome1,
    "functional groups": _functional_groups,
    "functional groups over a top-level window": lambda u8: _functional_groups(
        u8, top_level_window=True
    ),
    "16-bit PNG with sBIT": _png_16_bit_sbit,
}
EXPECTED_SOURCE = {
    "VOI LUT with OW LUTData": "voi_lut",
    "PixelPaddingValue out of min-max": "min_max",
    "PixelPaddingRangeLimit": "min_max",
    "PixelPaddingValue 65535 with BitsStored 12": "min_max",
}


@pytest.mark.parametrize("rule", sorted(DISPLAY_RULES))
def test_display_rules_give_the_png(reference_u8: np.ndarray, rule: str) -> None:
    data, expected = DISPLAY_RULES[rule](reference_u8)
    decoded = decode_image(data)
    _assert_unit_gray(decoded.pixels, expected.shape)
    np.testing.assert_allclose(decoded.pixels, expected, atol=5e-4, rtol=0)
    assert not [w for w in decoded.warnings if "could not" in w or "malformed" in w]
    assert decoded.image is not None
    if decoded.source == "dicom":
        assert decoded.image.window_source == EXPECTED_SOURCE.get(rule, "window")
        assert decoded.eligibility is not None and decoded.eligibility.eligible


def test_ow_lut_data_is_what_implicit_vr_files_hold(reference_u8: np.ndarray) -> None:
    data, _ = _voi_lut_ow(reference_u8)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.VOILUTSequence[0]["LUTData"].VR == "OW"
    # pydicom's own pipeline on the same file, scaled from the LUT's 16-bit output.
    modality = np.rint(apply_modality_lut(ds.pixel_array, ds)).astype(np.int64)
    want = apply_voi_lut(modality, ds) / 65535.0
    np.testing.assert_allclose(decode_image(data).pixels, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "rule",
    [
        "PresentationLUTShape INVERSE on MONOCHROME2",
        "MONOCHROME1 with INVERSE, once",
        "functional groups",
        "VOI LUT with OW LUTData",
    ],
)
def test_display_matches_highdicoms_pipeline(reference_u8: np.ndarray, rule: str) -> None:
    """highdicom's Image.get_frame applies modality, VOI and presentation LUTs from the
    top level or the functional groups; ours must agree on the same file (within 1e-3:
    highdicom's window arithmetic differs from pydicom's by up to 4e-4 after a rescale; a wrong
    window or a missed inversion is off by far more)."""
    import highdicom

    data, _ = DISPLAY_RULES[rule](reference_u8)
    image = highdicom.Image.from_dataset(pydicom.dcmread(io.BytesIO(data)), copy=False)
    want = image.get_frame(1, apply_voi_transform=True, voi_output_range=(0.0, 1.0))
    np.testing.assert_allclose(decode_image(data).pixels, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_fast_rescale_and_window_path_equals_pydicoms(
    reference_u8: np.ndarray, function: str, photometric: str
) -> None:
    """The float32 rescale + window path against pydicom's apply_modality_lut +
    apply_windowing (float64) on the same file, scaled by pydicom's output range."""
    ds = factory.make_dataset(
        reference_u8,
        bits_stored=12,
        photometric=photometric,
        window=(0.0, 1800.0),
        RescaleSlope=0.5,
        RescaleIntercept=-1024,
        VOILUTFunction=function,
    )
    data = factory.to_bytes(ds)
    read = pydicom.dcmread(io.BytesIO(data))
    windowed = apply_windowing(apply_modality_lut(read.pixel_array, read), read)
    y_min, y_max = 0 * 0.5 - 1024, 4095 * 0.5 - 1024  # pydicom's range for 12-bit unsigned
    want = (windowed - y_min) / (y_max - y_min)
    if photometric == "MONOCHROME1":
        want = 1.0 - want
    decoded = decode_image(data)
    assert decoded.image is not None and decoded.image.window_source == "window"
    np.testing.assert_allclose(decoded.pixels, want, atol=2e-6, rtol=0)


def test_padding_counts_for_nothing_even_inside_a_window(reference_u8: np.ndarray) -> None:
    stored = _with_border(factory.stored_values(reference_u8, 12), 4095)
    ds = factory.make_dataset(stored, bits_stored=12, PixelPaddingValue=4095)
    pixels = decode_image(factory.to_bytes(ds)).pixels
    assert (pixels[:BORDER] == 0).all() and (pixels[:, -BORDER:] == 0).all()
    # Without the padding attribute the same border is white: the attribute is what counts.
    del ds.PixelPaddingValue
    assert (decode_image(factory.to_bytes(ds)).pixels[:BORDER] == 1).all()


def test_16_bit_png_without_sbit_below_4096_warns(reference_u8: np.ndarray) -> None:
    png = _png_bytes(Image.fromarray(factory.stored_values(reference_u8, 12)))
    decoded = decode_image(png)
    np.testing.assert_allclose(decoded.pixels, factory.stored_values(reference_u8, 12) / 65535)
    assert len(decoded.warnings) == 1 and "sBIT" in decoded.warnings[0]
    assert decoded.image is not None and decoded.image.bits_stored == 16


def test_16_bit_png_with_sbit_but_scaled_values_divides_by_65535(reference_u8: np.ndarray) -> None:
    """A scaled export (12 significant bits shifted to the top) keeps /65535, no warning."""
    shifted = factory.stored_values(reference_u8, 12) << 4
    decoded = decode_image(_png_with_sbit(_png_bytes(Image.fromarray(shifted)), 12))
    np.testing.assert_allclose(decoded.pixels, shifted / 65535, atol=1e-6)
    assert decoded.warnings == ()


def test_presentation_lut_shape_identity_keeps_monochrome2(reference_u8: np.ndarray) -> None:
    ds = factory.make_dataset(reference_u8, bits_stored=12, PresentationLUTShape="IDENTITY")
    np.testing.assert_allclose(
        decode_image(factory.to_bytes(ds)).pixels, reference_u8 / 255.0, atol=5e-4
    )


# ------------------------------------------------------------------------------------------
# Aspect ratio: the card's input.resize


def test_resize_modes(reference_u8: np.ndarray) -> None:
    """squash stretches; center_crop equals resizing the centre crop; pad fits the whole image
    inside black borders."""
    tall = _with_border(reference_u8 / np.float32(255), 0.0)[:, BORDER:-BORDER]  # 1216 x 1024
    tall = np.ascontiguousarray(tall, dtype=np.float32)
    squash = fit_gray(tall, 64, 64, "bicubic", "squash")
    np.testing.assert_array_equal(squash, resize_gray(tall, 64, 64, "bicubic"))
    crop = fit_gray(tall, 64, 64, "bicubic", "center_crop")
    np.testing.assert_allclose(crop, resize_gray(reference_u8, 64, 64, "bicubic"), atol=1e-6)
    padded = fit_gray(reference_u8, 64, 80, "bicubic", "pad")
    assert padded.shape == (64, 80)
    assert (padded[:, :8] == 0).all() and (padded[:, -8:] == 0).all()
    np.testing.assert_allclose(padded[:, 8:72], resize_gray(reference_u8, 64, 64), atol=1e-6)
    for mode in ("squash", "pad", "center_crop"):  # a square image: all the same resize
        np.testing.assert_array_equal(
            fit_gray(reference_u8, 64, 64, "bicubic", mode), resize_gray(reference_u8, 64, 64)
        )


def test_bundled_card_says_squash() -> None:
    card = ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")
    assert card.input.resize == "squash"
    assert InputSpec(height=8, width=8, mean=(0, 0, 0), std=(1, 1, 1)).resize == "squash"


# ------------------------------------------------------------------------------------------
# Scores through the bundled model (the acceptance: within 0.02 of the PNG)


@pytest.fixture(scope="module")
def bundled_scores() -> Callable[..., np.ndarray]:
    if not (DEFAULT_MODEL_DIR / "model_card.json").is_file():
        pytest.skip(f"no bundled model at {DEFAULT_MODEL_DIR}")
    import onnxruntime as ort

    card = ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(DEFAULT_MODEL_DIR / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )

    def run(data: bytes, resize: str | None = None) -> np.ndarray:
        spec = card.input if resize is None else card.input.model_copy(update={"resize": resize})
        x = to_model_input(decode_image(data).pixels, spec)
        (logits,) = session.run(["logits"], {"pixel_values": x[None]})
        return 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64)))

    return run


@pytest.fixture(scope="module")
def score_pngs(nih_dir: Path) -> list[Path]:
    pngs = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))
    return [pngs[i] for i in SCORE_IMAGES]


@pytest.mark.parametrize("rule", sorted(DISPLAY_RULES))
def test_display_rules_score_as_the_png(bundled_scores, score_pngs, rule: str) -> None:
    for path in score_pngs:
        u8 = factory.png_gray(path)
        data, expected = DISPLAY_RULES[rule](u8)
        want = bundled_scores(
            path.read_bytes() if expected.shape == u8.shape else _png_of(expected)
        )
        got = bundled_scores(data)
        assert np.abs(got - want).max() <= 0.02, (rule, path.name, np.abs(got - want).max())


def test_a_35x43_detector_image_center_cropped_scores_as_the_png(
    bundled_scores, score_pngs
) -> None:
    """A portrait detector image (anatomy with padded bands above and below): with a card that
    says center_crop it scores as the square PNG does."""
    for path in score_pngs:
        u8 = factory.png_gray(path)
        rows = round(u8.shape[1] * 43 / 35)
        band = (rows - u8.shape[0]) // 2
        stored = np.pad(factory.stored_values(u8, 12), ((band, rows - u8.shape[0] - band), (0, 0)))
        ds = factory.make_dataset(stored, bits_stored=12, PixelPaddingValue=0)
        got = bundled_scores(factory.to_bytes(ds), resize="center_crop")
        want = bundled_scores(path.read_bytes())
        assert np.abs(got - want).max() <= 0.02, (path.name, np.abs(got - want).max())
