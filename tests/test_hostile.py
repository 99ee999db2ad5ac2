"""Hostile and broken uploads against the real app: each a 4xx problem+json, none harms the next.

Every case is built from a real shared file (a NIH PNG, a real CR DICOM's header) or is a
well-known hostile shape (bombs, lying headers, foreign formats). After each one a valid image
must still score exactly as it did before the attack.
"""

from __future__ import annotations

import io
import os
import sqlite3
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from app.api.limits import MIB
from app.api.problems import PROBLEM_MEDIA_TYPE
from app.main import create_app
from app.settings import Settings

# PIL warns on its way to refusing the 10000x10000 PNG header; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

UPLOAD_LIMIT_MB = 8
MAX_PIXELS = 16_000_000
REAL_DICOM = "pydicomdata__RG1_UNCR.dcm"  # a real CR, uncompressed, 16-bit


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "audit.sqlite"


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, audit_db: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=tiny_model_dir,
        intra_op_threads=1,
        api_keys=None,
        audit_db=audit_db,
        max_upload_mb=UPLOAD_LIMIT_MB,
        max_pixels=MAX_PIXELS,
        log_json=False,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def png(nih_dir: Path) -> bytes:
    return sorted((nih_dir / "images" / "nih-256").glob("*.png"))[0].read_bytes()


@pytest.fixture(scope="module")
def real_dicom(dicom_dir: Path) -> bytes:
    return (dicom_dir / "chest" / REAL_DICOM).read_bytes()


@pytest.fixture(scope="module")
def baseline(client: TestClient, png: bytes) -> list[float]:
    return score_png(client, png)


def score_png(client: TestClient, png: bytes) -> list[float]:
    response = client.post("/predict", content=png, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return [finding["probability"] for finding in response.json()["findings"]]


# ------------------------------------------------------------------------------ builders


def _save(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def small_dicom(real: bytes, rows: int = 64, cols: int = 64) -> pydicom.Dataset:
    """The real file's header around a small 16-bit image, so every case stays fast."""
    ds = pydicom.dcmread(io.BytesIO(real))
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def zeros_deflated(n_bytes: int, *, raw: bool = False, compressor: Any = None) -> bytes:
    """``n_bytes`` of zeros, compressed (zlib, or raw deflate for DICOM), built in slices."""
    compressor = compressor or zlib.compressobj(9, zlib.DEFLATED, -15 if raw else 15)
    block = b"\0" * MIB
    parts = [compressor.compress(block) for _ in range(n_bytes // MIB)]
    parts.append(compressor.compress(b"\0" * (n_bytes % MIB)))
    return b"".join(parts) + compressor.flush()


def png_bomb() -> bytes:
    """A valid 5000x5000 grey PNG of zeros: 25 M pixels in about 25 kB."""
    side = 5000
    row = side + 1  # filter byte + pixels
    return png_bytes(side, side, zeros_deflated(row * side))


def deflated_dicom_bomb(real: bytes) -> bytes:
    """A Deflated Explicit VR DICOM whose dataset inflates to a 6000x6000 16-bit image (72 MB)."""
    ds = small_dicom(real)
    side = 6000
    ds.Rows = ds.Columns = side
    del ds.PixelData
    dataset = DicomBytesIO()
    dataset.is_little_endian, dataset.is_implicit_VR = True, False
    write_dataset(dataset, ds)
    meta = DicomBytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta)
    n_bytes = side * side * 2
    pixel_header = b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", n_bytes)
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    prefix = head.compress(dataset.getvalue() + pixel_header)
    body = zeros_deflated(n_bytes, raw=True, compressor=head)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + prefix + body


def jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG whose frame header claims a huge image, then ends."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def zip_of(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One hostile request: how to send it and which 4xx statuses are right for it."""

    name: str
    build: Callable[[bytes, bytes], dict[str, Any]]
    statuses: frozenset[int]


def raw(media: str, body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": media}}


def part(body: bytes, media: str = "application/octet-stream") -> dict[str, Any]:
    return {"files": {"file": ("upload.bin", body, media)}}


def _lying_rows(real: bytes) -> bytes:
    ds = small_dicom(real)
    ds.Rows = 4096  # the pixel data holds 64 rows
    return _save(ds)


def _huge_claim(real: bytes) -> bytes:
    ds = small_dicom(real)
    ds.Rows = ds.Columns = 65535
    return _save(ds)


def _no_pixels(real: bytes) -> bytes:
    ds = small_dicom(real)
    del ds.PixelData
    return _save(ds)


def _rgb(real: bytes) -> bytes:
    ds = small_dicom(real)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.full((64, 64, 3), 128, np.uint8).tobytes()
    return _save(ds)


B4 = frozenset({400, 413, 415, 422})  # any of the decoder's answers to a file it cannot use

CASES = [
    Case("empty raw body", lambda png, dcm: raw("image/png", b""), frozenset({400})),
    Case("empty multipart file", lambda png, dcm: part(b"", "image/png"), frozenset({400})),
    Case("truncated PNG", lambda png, dcm: raw("image/png", png[: len(png) // 2]), B4),
    Case("truncated DICOM", lambda png, dcm: raw("application/dicom", dcm[: len(dcm) // 2]), B4),
    Case("PNG header only", lambda png, dcm: raw("image/png", png[:33]), B4),
    Case("text/plain body", lambda png, dcm: raw("text/plain", png), frozenset({415})),
    Case("JSON body", lambda png, dcm: raw("application/json", b'{"file": 1}'), frozenset({415})),
    Case("no content type", lambda png, dcm: {"content": png}, frozenset({415})),
    Case(
        "multipart without file field",
        lambda png, dcm: {"data": {"image": "x"}, "files": {"other": ("a.png", png, "image/png")}},
        frozenset({400, 422}),
    ),
    Case(
        "multipart with a broken boundary",
        lambda png, dcm: raw("multipart/form-data; boundary=zzz", b"--yyy\r\n\r\n" + png),
        frozenset({400, 422}),
    ),
    Case(
        "random bytes after the DICM magic",
        lambda png, dcm: raw("application/dicom", b"\0" * 128 + b"DICM" + os.urandom(4096)),
        B4,
    ),
    Case("random bytes", lambda png, dcm: raw("application/dicom", os.urandom(4096)), B4),
    Case("DICOM without pixel data", lambda png, dcm: part(_no_pixels(dcm)), B4),
    Case("DICOM with lying rows", lambda png, dcm: part(_lying_rows(dcm)), B4),
    Case("DICOM claiming 65535x65535", lambda png, dcm: part(_huge_claim(dcm)), frozenset({413})),
    Case("RGB DICOM", lambda png, dcm: part(_rgb(dcm)), B4),
    Case(
        "PNG claiming 10000x10000",
        lambda png, dcm: raw("image/png", png_bytes(10000, 10000, zlib.compress(b"\0" * 1000))),
        frozenset({413}),
    ),
    Case(
        "JPEG claiming 60000x60000",
        lambda png, dcm: raw("image/jpeg", jpeg_claiming(60000, 60000)),
        frozenset({413, 422}),
    ),
    Case("PNG decompression bomb", lambda png, dcm: raw("image/png", png_bomb()), frozenset({413})),
    Case(
        "deflated DICOM bomb",
        lambda png, dcm: raw("application/dicom", deflated_dicom_bomb(dcm)),
        frozenset({413}),
    ),
    Case(
        "PDF",
        lambda png, dcm: part(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n"),
        frozenset({415}),
    ),
    Case(
        "ZIP of a DICOM",
        lambda png, dcm: part(zip_of("chest.dcm", _save(small_dicom(dcm)))),
        frozenset({415}),
    ),
    Case(
        "oversize upload",
        lambda png, dcm: raw("application/dicom", b"\0" * (UPLOAD_LIMIT_MB * MIB + 1)),
        frozenset({413}),
    ),
    Case(
        "oversize chunked upload",
        lambda png, dcm: raw(
            "application/dicom", iter([b"\0" * MIB for _ in range(UPLOAD_LIMIT_MB + 2)])
        ),
        frozenset({413}),
    ),
    Case(
        "bad query value",
        lambda png, dcm: {**raw("image/png", png), "params": {"heatmap": "perhaps"}},
        frozenset({422}),
    ),
]


def assert_problem(response: Any, statuses: frozenset[int]) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == response.status_code
    assert body["type"].startswith("https://") and body["detail"]
    assert response.headers["x-request-id"] == body["request_id"]
    return body


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_upload_is_a_4xx_and_harmless(
    client: TestClient, png: bytes, real_dicom: bytes, baseline: list[float], case: Case
) -> None:
    response = client.post("/predict", **case.build(png, real_dicom))
    assert_problem(response, case.statuses)
    assert score_png(client, png) == baseline
    assert client.get("/readyz").status_code == 200


def test_multi_frame_uses_first_frame_and_says_so(client: TestClient, real_dicom: bytes) -> None:
    ds = small_dicom(real_dicom)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    response = client.post("/predict", **part(_save(ds)))
    if response.status_code == 200:
        assert any("frame" in warning for warning in response.json()["warnings"])
    else:
        assert_problem(response, B4)


def test_413_comes_before_the_body_is_read(client: TestClient) -> None:
    """A declared Content-Length over the limit is refused although no body follows it."""
    response = client.post(
        "/predict",
        content=b"",
        headers={"Content-Type": "application/dicom", "Content-Length": str(64 * MIB)},
    )
    assert_problem(response, frozenset({413}))


def test_every_hostile_request_is_audited(client: TestClient, audit_db: Path) -> None:
    """Refused requests leave a row too, with the status the client saw and the problem type."""
    first = client.post("/predict", content=b"%PDF-1.4", headers={"Content-Type": "image/png"})
    second = client.post("/predict", content=b"\0" * (UPLOAD_LIMIT_MB * MIB + 1))
    assert client.app.state.audit.flush()  # type: ignore[attr-defined]
    conn = sqlite3.connect(audit_db)
    try:
        rows = {
            request_id: (status, problem)
            for request_id, status, problem in conn.execute(
                "SELECT request_id, status, problem FROM predictions"
            )
        }
    finally:
        conn.close()
    assert rows[first.headers["x-request-id"]] == (415, "unsupported-media-type")
    assert rows[second.headers["x-request-id"]] == (413, "upload-too-large")
    assert all(status < 500 for status, _ in rows.values())
