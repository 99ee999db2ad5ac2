"""Decode and decode+preprocess time per image, for PNG/JPEG and each DICOM transfer syntax.

    .venv/bin/python benchmarks/decode_bench.py [--data-dir ../shared/data] [--repeats 10]

Rows come from the shared data (NIH PNGs, every decodable shared DICOM) plus in-memory
re-encodings of one real NIH image for the formats the shared data lacks (16-bit PNG, JPEG, RLE,
deflate, implicit VR, a bare dataset). ``serve_bench.py`` imports :func:`decode_timings` for its
part (c); importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
BROKEN_DICOMS = {"pylibjpegdata__966.dcm", "pylibjpegdata__RG2_JPLY.dcm"}


def _timings_ms(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) ms over ``repeats`` calls after a warm-up call. On a shared machine the
    minimum is the better estimate of the uncontended cost; the median is what a busy one sees."""
    func()  # warm-up: imports, plugin discovery, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times), 1000.0 * min(times)


def _synthetic_samples(png_path: Path) -> list[tuple[str, str, bytes]]:
    """(name, encoding, bytes) re-encodings of one real 8-bit NIH PNG."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        generate_uid,
    )

    u8 = np.asarray(Image.open(png_path).convert("L"))
    samples: list[tuple[str, str, bytes]] = []

    def save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    samples.append(
        ("16-bit PNG", "PNG 16-bit", save(Image.fromarray(u8.astype(np.uint16) * 257), "PNG"))
    )
    samples.append(("JPEG q95 (L)", "JPEG", save(Image.fromarray(u8), "JPEG", quality=95)))
    samples.append(
        ("JPEG q95 (RGB)", "JPEG", save(Image.fromarray(u8).convert("RGB"), "JPEG", quality=95))
    )

    def dataset() -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns = u8.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = (u8.astype(np.uint16) * 16).tobytes()
        return ds

    def write(ds: Dataset, **kwargs: Any) -> bytes:
        buf = io.BytesIO()
        ds.save_as(buf, **kwargs)
        return buf.getvalue()

    for tsyntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless):
        ds = dataset()
        if tsyntax == RLELossless:
            ds.compress(tsyntax)
        else:
            ds.file_meta.TransferSyntaxUID = tsyntax
        samples.append(("12-bit DICOM", tsyntax.name, write(ds, enforce_file_format=True)))
    bare = dataset()
    del bare.file_meta
    samples.append(
        ("12-bit DICOM, no meta", "bare dataset (implicit VR)", write(bare, implicit_vr=True))
    )
    return samples


def decode_timings(data_dir: str | Path, repeats: int = 10) -> list[dict[str, Any]]:
    """Median ms to decode, and to decode + preprocess to 224x224, per sample.

    Each row: ``file``, ``format`` (png/jpeg/dicom), ``transfer_syntax`` (the DICOM transfer
    syntax's name, or the image format), ``size`` ("WxH"), ``bytes``, ``decode_ms``,
    ``decode_preprocess_ms`` (medians), ``decode_min_ms``, ``decode_preprocess_min_ms``
    (minima) and ``synthetic`` (True for in-memory re-encodings).
    """
    from app.card import InputSpec
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import to_model_input

    spec = InputSpec(height=224, width=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rows = []
    for name, encoding, data, synthetic in collect_samples(data_dir):
        decoded = decode_image(data)
        height, width = decoded.pixels.shape
        decode = _timings_ms(lambda d=data: decode_image(d), repeats)
        both = _timings_ms(lambda d=data: to_model_input(decode_image(d).pixels, spec), repeats)
        rows.append(
            {
                "file": name,
                "format": decoded.source,
                "transfer_syntax": encoding,
                "size": f"{width}x{height}",
                "bytes": len(data),
                "decode_ms": decode[0],
                "decode_min_ms": decode[1],
                "decode_preprocess_ms": both[0],
                "decode_preprocess_min_ms": both[1],
                "synthetic": synthetic,
            }
        )
    return rows


def collect_samples(data_dir: str | Path) -> list[tuple[str, str, bytes, bool]]:
    """(name, encoding, bytes, synthetic) for every format and transfer syntax benchmarked:
    the shared data's NIH PNGs (one per mode, and the 256/64 px subsets), every decodable shared
    DICOM, and in-memory re-encodings of a real NIH image for what the data lacks."""
    import pydicom

    data_dir = Path(data_dir)
    nih = data_dir / "nih" / "images"
    png_1024 = sorted((nih / "nih-1024").glob("*.png"))
    samples: list[tuple[str, str, bytes, bool]] = []
    if png_1024:
        from PIL import Image

        by_mode: dict[str, Path] = {}
        for path in png_1024:
            by_mode.setdefault(Image.open(path).mode, path)
        for mode, path in sorted(by_mode.items()):
            samples.append((path.name, f"PNG {mode}", path.read_bytes(), False))
        for name, encoding, data in _synthetic_samples(by_mode.get("L", png_1024[0])):
            samples.append((name, encoding, data, True))
    for subset in ("nih-256", "nih-64"):
        first = next(iter(sorted((nih / subset).glob("*.png"))), None)
        if first is not None:
            samples.append((f"{subset}/{first.name}", "PNG RGB", first.read_bytes(), False))

    for path in sorted((data_dir / "dicom").glob("*/*.dcm")):
        if path.name in BROKEN_DICOMS:
            continue
        tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        samples.append((path.name, tsyntax.name, path.read_bytes(), False))
    return samples


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: median (min) ms for decode and for decode + preprocess."""
    header = (
        f"{'file':<36} {'encoding':<44} {'size':>9} {'bytes':>9} "
        f"{'decode ms':>16} {'+preprocess ms':>16}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row["file"] + (" *" if row["synthetic"] else "")
        decode = f"{row['decode_ms']:.1f} ({row['decode_min_ms']:.1f})"
        both = f"{row['decode_preprocess_ms']:.1f} ({row['decode_preprocess_min_ms']:.1f})"
        lines.append(
            f"{name[:36]:<36} {row['transfer_syntax'][:44]:<44} {row['size']:>9} "
            f"{row['bytes']:>9} {decode:>16} {both:>16}"
        )
    lines.append(
        "median (min) ms; +preprocess = decode, resize to 224x224, normalise; "
        "* = in-memory re-encoding of a real NIH image"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    default_data = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(format_table(decode_timings(args.data_dir, repeats=args.repeats)))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # run as a script: make the app package importable
    main()
