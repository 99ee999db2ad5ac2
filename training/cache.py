"""Decode every image once into a uint8 array on disk, so epochs never touch PNG decoding.

Decoding 112k 1024x1024 PNGs costs far more than a ViT-B/16 epoch on a GPU, so ``cxr-triage
cache`` does it once with the service's own decoder and resizer
(``app.imaging.decode.decode_image`` then ``app.imaging.preprocess.resize_gray``, exactly what
serving does before normalising) and stores the result:

    CACHE/images.npy   uint8 [N, H, W] (a .npy memmap: np.load(mmap_mode="r"))
    CACHE/index.csv    the label table (file, patient_id, official_split, labels) + ``row``
    CACHE/cache.json   size, interpolation, labels, counts, failures

Images that fail to decode are listed in cache.json and left out of the index. Storing uint8 costs
at most 1/510 of the [0, 1] range against serving's float path, below the decoder's own precision
for 8-bit PNGs.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from app.labels import NIH_LABELS

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Cache:
    """An opened cache: the memmapped images and the label table that indexes them."""

    path: Path
    images: np.ndarray
    index: pd.DataFrame
    size: int
    interpolation: str
    labels: tuple[str, ...]

    @property
    def targets(self) -> np.ndarray:
        return self.index[list(self.labels)].to_numpy(dtype=np.float32)


def load_image(path: str, size: int, interpolation: str) -> np.ndarray:
    """Decode and resize one file exactly as serving does, then quantise to uint8."""
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import resize_gray

    data = Path(path).read_bytes()
    pixels = decode_image(data).pixels
    resized = resize_gray(pixels, size, size, interpolation)
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def _load_chunk(
    args: tuple[list[tuple[int, str]], int, str],
) -> list[tuple[int, np.ndarray | None, str]]:
    items, size, interpolation = args
    out: list[tuple[int, np.ndarray | None, str]] = []
    for i, path in items:
        try:
            out.append((i, load_image(path, size, interpolation), ""))
        except Exception as exc:  # a bad file is reported, not fatal for a 112k-image cache
            out.append((i, None, f"{type(exc).__name__}: {exc}"))
    return out


def build_cache(
    table: pd.DataFrame,
    out: str | Path,
    *,
    size: int,
    interpolation: str = "bicubic",
    workers: int | None = None,
    labels: tuple[str, ...] = NIH_LABELS,
    progress: bool = True,
    source: str = "",
) -> Cache:
    """Decode ``table``'s files into ``out`` with ``workers`` processes; returns the open cache."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = table["file"].tolist()
    workers = workers or max(1, os.cpu_count() or 1)
    tmp = out / "images.npy.partial"
    images = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)
    )
    ok = np.zeros(len(paths), dtype=bool)
    failures: dict[str, str] = {}
    chunk = 16
    jobs = [
        ([(i, p) for i, p in enumerate(paths[s : s + chunk], start=s)], size, interpolation)
        for s in range(0, len(paths), chunk)
    ]
    bar = tqdm(total=len(paths), desc=f"cache {size}px", unit="img", disable=not progress)
    if workers == 1:
        results: Iterator = map(_load_chunk, jobs)
        pool = None
    else:
        # spawn, not fork: ``train`` builds the cache after torch (and its OpenMP pool) loaded
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        results = pool.map(_load_chunk, jobs)
    try:
        for batch in results:
            for i, arr, err in batch:
                if arr is None:
                    failures[paths[i]] = err
                else:
                    images[i] = arr
                    ok[i] = True
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    images.flush()
    del images
    os.replace(tmp, out / "images.npy")
    if failures:
        log.warning("%d images failed to decode; listed in cache.json", len(failures))
    index = table.copy()
    index.insert(0, "row", np.arange(len(table)))
    index[ok].to_csv(out / "index.csv", index=False)
    meta = {
        "format": FORMAT_VERSION,
        "size": size,
        "interpolation": interpolation,
        "labels": list(labels),
        "images": int(ok.sum()),
        "failed": failures,
        "source": source,
    }
    (out / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    return open_cache(out)


def open_cache(path: str | Path) -> Cache:
    """Open a cache folder written by build_cache (images memory-mapped, not read)."""
    path = Path(path)
    meta_path = path / "cache.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a cache (no cache.json); run `cxr-triage cache`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: cache format {meta.get('format')} != {FORMAT_VERSION}; rebuild it"
        )
    index = pd.read_csv(
        path / "index.csv", dtype={"patient_id": str, "official_split": str}, keep_default_na=False
    )
    images = np.load(path / "images.npy", mmap_mode="r")
    return Cache(
        path=path,
        images=images,
        index=index,
        size=int(meta["size"]),
        interpolation=str(meta["interpolation"]),
        labels=tuple(meta["labels"]),
    )
