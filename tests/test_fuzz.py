"""Fuzz the decoder: whatever the bytes, ``decode_image`` returns a valid image or raises
``DecodeError`` (a 4xx problem); no other exception may escape to become a 500.

Three generators: arbitrary bytes, bytes behind each format's magic (so the parsers behind the
sniffer get exercised, not only the sniffer), and random edits (flips, overwrites, inserts,
deletions, truncations) of real files: a NIH PNG, a JPEG of it, small DICOMs carrying a real CR
header (uncompressed, RLE, deflated, bare dataset) and a real JPEG 2000 DICOM. Example counts
are bounded so the module runs in seconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless

from app.imaging.decode import DecodedImage, DecodeError, decode_image

# pydicom warns its way through broken files before the decoder refuses them: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

MAX_PIXELS = 4_000_000
CONTENT_TYPES = (None, "image/png", "image/jpeg", "application/dicom", "application/octet-stream")
MAGICS = (
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xc0\x00\x11\x08",
    b"\x00" * 128 + b"DICM",
    b"\x00" * 128 + b"DICM\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00",
    b"\x00" * 128 + b"DICM\x02\x00\x10\x00UI\x16\x001.2.840.10008.1.2.1.99",
    b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",
    b"\x08\x00\x16\x00",
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",
)
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(data: bytes, content_type: str | None) -> None:
    """The property: a well-formed image, or a DecodeError with a 4xx status."""
    try:
        image = decode_image(data, content_type=content_type, max_pixels=MAX_PIXELS)
    except DecodeError as exc:
        assert exc.status in (400, 413, 415, 422), exc.status
        assert exc.detail
        return
    assert isinstance(image, DecodedImage)
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert image.pixels.size <= MAX_PIXELS
    assert np.isfinite(image.pixels).all()
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def _small_dicom(real: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(real)
    ds.Rows, ds.Columns = 48, 40
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(48 * 40, dtype=np.uint16) * 7 % 4096).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _bytes(ds: pydicom.Dataset, *, bare: bool = False) -> bytes:
    out = io.BytesIO()
    if bare:
        ds.save_as(out, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def seeds(nih_dir: Path, dicom_dir: Path) -> list[bytes]:
    """Small real files in every container the decoder handles."""
    png_path = sorted((nih_dir / "images" / "nih-64").glob("*.png"))[0]
    png = png_path.read_bytes()
    jpeg = io.BytesIO()
    Image.open(png_path).convert("L").save(jpeg, "JPEG", quality=80)
    real = dicom_dir / "chest" / "pydicomdata__RG1_UNCR.dcm"
    plain = _small_dicom(real)
    rle = _small_dicom(real)
    rle.compress(RLELossless)
    deflated = _small_dicom(real)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bare = _small_dicom(real)
    del bare.file_meta
    bare.preamble = None
    j2k = (dicom_dir / "nonchest" / "pydicomdata__RG3_J2KI.dcm").read_bytes()
    files = [
        png,
        jpeg.getvalue(),
        _bytes(plain),
        _bytes(rle),
        _bytes(deflated),
        _bytes(bare, bare=True),
        j2k,
    ]
    for data in files:  # every seed must decode before mutations of it mean anything
        decode_image(data, max_pixels=MAX_PIXELS)
    return files


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed file with 1 to 8 random edits, biased towards its header."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 1024)
        at = draw(st.integers(0, limit))
        kind = draw(st.sampled_from(("flip", "byte", "insert", "delete", "truncate", "word")))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        else:  # an extreme 16/32-bit value where a length or dimension may sit
            word = draw(st.sampled_from((b"\xff\xff", b"\x00\x00", b"\xff\xff\xff\xff", b"\x7f")))
            data[at : at + len(word)] = word
    return bytes(data)


@settings(FUZZ, max_examples=150)
@given(data=st.binary(max_size=2048), content_type=st.sampled_from(CONTENT_TYPES))
def test_arbitrary_bytes(data: bytes, content_type: str | None) -> None:
    check(data, content_type)


@settings(FUZZ, max_examples=250)
@given(
    magic=st.sampled_from(MAGICS),
    tail=st.binary(max_size=2048),
    content_type=st.sampled_from(CONTENT_TYPES),
)
def test_bytes_behind_a_magic(magic: bytes, tail: bytes, content_type: str | None) -> None:
    check(magic + tail, content_type)


def test_mutated_real_files(seeds: list[bytes]) -> None:
    @settings(FUZZ, max_examples=400)
    @given(data=mutated(seeds), content_type=st.sampled_from(CONTENT_TYPES))
    def run(data: bytes, content_type: str | None) -> None:
        check(data, content_type)

    run()
