"""One upload's pixels to the model's input: decode, then preprocess (runs in a decode pool).

Two pools can run it. The thread pool (``CXR_DECODE_WORKERS``) is always there: decoding is
mostly C code (zlib, libjpeg, openjpeg) that releases the GIL, and threads share memory for free.
On a many-core GPU host the GIL-bound part (pydicom parsing, the Python glue) caps a single
process at a few cores, so :class:`DecodeProcesses` (``CXR_DECODE_PROCESSES``) adds worker
processes for the requests that need only the model input (no heatmap): the upload goes over as
bytes, the ``[3, H, W]`` input (600 KB at 224 px) comes back, the full-size pixels never cross.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from PIL import Image

from app.api.problems import Problem
from app.card import InputSpec, ModelCard
from app.imaging.decode import DecodedImage, DecodeError, decode_image
from app.imaging.preprocess import to_model_input

logger = logging.getLogger(__name__)

# Pillow returns every image's memory blocks to the OS as soon as the image goes, so each upload
# paid for fresh pages (zero fill and page faults, ~4 ms of a 17 ms 1024 px PNG decode + resize,
# measured with benchmarks/decode_bench.py). Keeping a few freed blocks for reuse removes that;
# the cost is at most PILLOW_BLOCKS x Pillow's block size (16 MiB) of idle memory. The
# PILLOW_BLOCKS_MAX environment variable, which Pillow reads itself, still wins.
PILLOW_BLOCKS = 8
if "PILLOW_BLOCKS_MAX" not in os.environ:
    Image.core.set_blocks_max(PILLOW_BLOCKS)

# What ``decoded.pixels`` holds when the caller said it will not use them (keep_pixels=False).
NO_PIXELS = np.zeros((0, 0), dtype=np.float32)
NO_PIXELS.setflags(write=False)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A decoded upload and its model input.

    ``decoded.pixels`` is the full-size image only when :func:`prepare` was asked to keep it;
    otherwise it is an empty ``(0, 0)`` array (the size stays in ``decoded.image``).
    """

    decoded: DecodedImage
    model_input: np.ndarray
    seconds: float


def prepare(
    data: bytes,
    content_type: str | None,
    card: ModelCard,
    max_pixels: int,
    *,
    keep_pixels: bool = True,
    reduce: bool = False,
) -> Prepared:
    """Decode and preprocess one upload (runs in the decode pool, off the event loop).

    ``keep_pixels=False`` (no heatmap overlay, no secondary capture to draw) drops the full-size
    pixels; with ``reduce`` as well, the codec decodes straight towards the model's size where
    it can (JPEG draft, JPEG 2000 resolution levels: :func:`~app.imaging.decode.decode_image`'s
    ``reduce_to``). Reduced decodes are faster but not identical: probabilities move a little
    (``CXR_REDUCED_DECODE``, off by default).
    """
    return prepare_input(
        data, content_type, card.input, max_pixels, keep_pixels=keep_pixels, reduce=reduce
    )


def prepare_input(
    data: bytes,
    content_type: str | None,
    spec: InputSpec,
    max_pixels: int,
    *,
    keep_pixels: bool = True,
    reduce: bool = False,
) -> Prepared:
    """:func:`prepare` given the card's input spec only (what a worker process is sent)."""
    start = time.perf_counter()
    reduce_to = (spec.height, spec.width) if reduce and not keep_pixels else None
    try:
        decoded = decode_image(
            data, content_type=content_type, max_pixels=max_pixels, reduce_to=reduce_to
        )
    except DecodeError:
        raise
    except Exception as exc:
        # decode_image promises DecodeError only; should a file still find a bug, the client
        # gets a 4xx for its bad upload and the traceback goes to the log, not to the client.
        logger.error("decoder raised %s", type(exc).__name__, exc_info=exc)
        raise Problem(422, "The image could not be decoded.", slug="undecodable-image") from exc
    model_input = np.ascontiguousarray(to_model_input(decoded.pixels, spec), np.float32)
    expected = (3, spec.height, spec.width)
    if model_input.shape != expected:
        raise RuntimeError(f"preprocessing gave {model_input.shape}, expected {expected}")
    if not keep_pixels:
        decoded = replace(decoded, pixels=NO_PIXELS)
    return Prepared(decoded, model_input, time.perf_counter() - start)


# -- the process pool ----------------------------------------------------------------------------


def decode_processes_for(
    setting: int | Literal["auto"], device: str, cpu_count: int | None = None
) -> int:
    """How many decode processes to run: the number given, or for ``auto``: ``cores - 2``
    (one core for the event loop and one for feeding the GPU), at most 32, when the model runs
    on CUDA and the host has at least 8 cores; else 0.

    On a CPU-only host ONNX Runtime already uses every core for inference, so processes would
    only add copies; below 8 cores the threads' GIL-free share (zlib, libjpeg, openjpeg) is
    enough (``benchmarks/decode_scaling.py`` shows where threads stop scaling).
    """
    if setting != "auto":
        return max(0, int(setting))
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if device != "cuda" or cores < 8:
        return 0
    return min(32, cores - 2)


@dataclass(frozen=True, slots=True)
class _Refused:
    """A :class:`Problem` on its way back from a worker.

    Problems do not survive pickling (their ``__init__`` takes more than the message), so the
    worker sends the class and its attributes and the parent rebuilds the same exception.
    """

    kind: type[Problem]
    state: dict[str, Any]

    def rebuild(self) -> Problem:
        problem = self.kind.__new__(self.kind)
        Exception.__init__(problem, self.state.get("detail", ""))
        problem.__dict__.update(self.state)
        return problem


def _prepare_in_worker(
    data: bytes, content_type: str | None, spec: InputSpec, max_pixels: int, reduce: bool = False
) -> Prepared | _Refused:
    try:
        return prepare_input(data, content_type, spec, max_pixels, keep_pixels=False, reduce=reduce)
    except Problem as exc:
        return _Refused(type(exc), dict(exc.__dict__))


def _warm_worker() -> int:
    """Run in each new worker so the imports (pydicom, Pillow, numpy) are paid at start-up."""
    return os.getpid()


class DecodeProcesses:
    """Worker processes that prepare uploads whose full-size pixels nobody needs.

    Spawned, not forked: the server process holds ONNX Runtime's and the event loop's threads,
    which a fork would copy in whatever state they were. A worker that dies (a decoder crashing
    on a hostile upload, the OOM killer) breaks the executor; that request gets a 422 and the
    pool is rebuilt, so one bad file costs one answer, not the service.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("DecodeProcesses needs at least one worker")
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context)

    def warm_up(self) -> list[int]:
        """Start every worker now (blocking), not on the first requests; returns their pids."""
        futures = [self._executor.submit(_warm_worker) for _ in range(self.workers)]
        return [f.result() for f in futures]

    async def prepare(
        self,
        data: bytes,
        content_type: str | None,
        spec: InputSpec,
        max_pixels: int,
        *,
        reduce: bool = False,
    ) -> Prepared:
        """:func:`prepare_input` with ``keep_pixels=False`` in a worker process."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            out = await loop.run_in_executor(
                executor, _prepare_in_worker, data, content_type, spec, max_pixels, reduce
            )
        except BrokenProcessPool:
            self._replace(executor)
            raise Problem(
                422,
                "The image could not be decoded (the decoder stopped on it).",
                slug="undecodable-image",
            ) from None
        if isinstance(out, _Refused):
            raise out.rebuild()
        return out

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Swap in a fresh executor once per breakage (concurrent requests see the same one)."""
        if self._executor is broken:
            logger.warning("a decode worker process died; starting a new pool")
            self._executor = self._new_executor()
            broken.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
