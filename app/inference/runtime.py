"""The model runtime: one ONNX Runtime session for a model folder, checked against its card.

A model folder is the only thing that passes from training to serving, so it is validated hard
at start-up: the card must parse, its sha256 must match ``model.onnx``, and the graph's inputs and
outputs must fit the card (input name/shape/dtype, one logit per label, a rank-3 heatmap, or
rank 4 when the card says ``per_label``). A mismatch stops the service with a message that names
the problem instead of serving nonsense.

Execution provider: CUDA when this onnxruntime build has it, a GPU is visible and the settings
allow it; else CPU. What actually runs is read back from ``session.get_providers()`` (ORT falls
back to CPU silently when CUDA fails to load), logged, and shown at ``/v1/model``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from app.card import ModelCard

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
CARD_FILE = "model_card.json"
INPUT_NAME = "pixel_values"
LOGITS_NAME = "logits"
HEATMAP_NAME = "heatmap"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

HOW_TO_GET_A_MODEL = (
    "A model folder holds model.onnx and model_card.json. To get one:\n"
    "  - train and export your own:  cxr-triage train --out runs/my-run ... && "
    "cxr-triage export --run runs/my-run --out models/default\n"
    "  - or point the service at an existing folder: CXR_MODEL_DIR=/path/to/model "
    "(or cxr-triage serve --model-dir /path/to/model)\n"
    "See docs/serving.md and docs/training.md."
)


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says why and what to do."""


def check_model_folder(model_dir: Path) -> tuple[Path, Path]:
    """The paths of ``model.onnx`` and ``model_card.json``, or a :class:`ModelLoadError`.

    Cheap (no ONNX parsing), so the CLI can call it before starting uvicorn and fail at once.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"No model folder at {model_dir}.\n{HOW_TO_GET_A_MODEL}")
    onnx_path, card_path = model_dir / ONNX_FILE, model_dir / CARD_FILE
    missing = [p.name for p in (onnx_path, card_path) if not p.is_file()]
    if missing:
        raise ModelLoadError(
            f"Model folder {model_dir} lacks {' and '.join(missing)}.\n{HOW_TO_GET_A_MODEL}"
        )
    return onnx_path, card_path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gpu_visible() -> bool:
    """Whether the CUDA driver sees at least one GPU.

    Asking the driver directly (``cuInit`` + ``cuDeviceGetCount``) avoids ORT's long error dump
    when it tries to load the CUDA provider library on a machine without a GPU or CUDA runtime.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return False
        except AttributeError:
            return False
        return count.value > 0
    return False


def choose_providers(setting: Literal["auto", "cuda", "cpu"]) -> list[str]:
    """The provider list to ask ORT for; ``cuda`` is strict, ``auto`` only tries a visible GPU."""
    available = ort.get_available_providers()
    if setting == "cpu":
        return [CPU]
    if setting == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                "CXR_PROVIDERS=cuda, but this onnxruntime build has no CUDA execution provider "
                f"(available: {available}). Install onnxruntime-gpu or use CXR_PROVIDERS=auto."
            )
        return [CUDA, CPU]
    if CUDA in available and gpu_visible():
        return [CUDA, CPU]
    return [CPU]


def session_options(intra_op_threads: int, allow_spinning: bool = True) -> ort.SessionOptions:
    """One request stream per session: sequential execution, a single inter-op thread.

    On CPU the intra-op pool is the only parallelism; more threads than cores makes ViT-B runs
    2-3x slower, so the default is one thread per core. ``allow_spinning=False`` makes idle
    intra-op threads sleep instead of busy-waiting for the next op, which leaves the cores to the
    decode workers between and during runs (see ``CXR_ORT_SPINNING``).
    """
    opts = ort.SessionOptions()
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        # Spin between the operators of a run, but not after it: ORT's threads otherwise keep
        # spinning once the run is over, on the cores the decode workers need (60 ms of CPU in
        # the 300 ms after a ViT-B/16 run without this, none with it: ort_threads_bench.py).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def _dim_ok(dim: object, expected: int) -> bool:
    """A graph dimension fits when it is symbolic/unknown or equals ``expected``."""
    return not isinstance(dim, int) or dim == expected


def validate_graph(session: ort.InferenceSession, card: ModelCard) -> None:
    """Check the graph's declared inputs/outputs against the card and DESIGN.md's contract."""
    problems: list[str] = []
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs:
        problems.append(f"no input named {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    else:
        inp = inputs[INPUT_NAME]
        if inp.type != "tensor(float)":
            problems.append(f"input {INPUT_NAME!r} is {inp.type}, expected tensor(float)")
        shape = list(inp.shape)
        expected = ["N", 3, card.input.height, card.input.width]
        if len(shape) != 4:
            problems.append(f"input {INPUT_NAME!r} has shape {shape}, expected {expected}")
        else:
            if isinstance(shape[0], int):
                problems.append(f"input batch dimension is fixed at {shape[0]}; it must be dynamic")
            for dim, exp in zip(shape[1:], expected[1:], strict=True):
                if not _dim_ok(dim, int(exp)):
                    problems.append(
                        f"input {INPUT_NAME!r} has shape {shape}, the card says {expected}"
                    )
                    break
    for name in (LOGITS_NAME, HEATMAP_NAME):
        if name not in outputs:
            problems.append(f"no output named {name!r} (outputs: {sorted(outputs)})")
        elif outputs[name].type != "tensor(float)":
            problems.append(f"output {name!r} is {outputs[name].type}, expected tensor(float)")
    if LOGITS_NAME in outputs:
        shape = list(outputs[LOGITS_NAME].shape)
        if len(shape) != 2 or not _dim_ok(shape[1], len(card.labels)):
            problems.append(
                f"output {LOGITS_NAME!r} has shape {shape}; the card has {len(card.labels)} "
                f"labels, so it must be [N, {len(card.labels)}]"
            )
    if HEATMAP_NAME in outputs:
        shape = list(outputs[HEATMAP_NAME].shape)
        if card.heatmap_shape == "per_label":
            if len(shape) != 4 or not _dim_ok(shape[1], len(card.labels)):
                problems.append(
                    f"output {HEATMAP_NAME!r} has shape {shape}; the card says per_label, so it "
                    f"must be [N, {len(card.labels)}, h, w]"
                )
        elif len(shape) != 3:
            problems.append(f"output {HEATMAP_NAME!r} has shape {shape}; it must be [N, h, w]")
    if problems:
        raise ModelLoadError("model.onnx does not match model_card.json: " + "; ".join(problems))


def _stream_session(
    onnx_path: Path, threads: int, allow_spinning: bool, providers: list[str]
) -> ort.InferenceSession | None:
    """The second session that concurrent batches run on, or None (one stream) if it cannot be
    made: the first session already loaded the same file, so this fails only for want of memory
    for a second copy of the weights, and the service is better served by one stream than by
    refusing to start."""
    try:
        return ort.InferenceSession(
            str(onnx_path),
            sess_options=session_options(threads, allow_spinning),
            providers=providers,
        )
    except Exception as exc:
        logger.warning("running one inference stream: the stream session failed to load: %s", exc)
        return None


def choose_batch_size(per_image_ms: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest batch size whose time per image is within ``tolerance`` of the best: a
    smaller batch waits less to fill and finishes sooner for the same throughput."""
    best = min(per_image_ms.values())
    return min(n for n, ms in per_image_ms.items() if ms <= (1 + tolerance) * best)


@dataclass
class ModelRuntime:
    """A loaded, validated model: the card, the session and what it runs on."""

    model_dir: Path
    card: ModelCard
    session: ort.InferenceSession
    requested_providers: list[str]
    intra_op_threads: int
    load_seconds: float
    heatmap_grid: tuple[int, int] | None = None
    stream_session: ort.InferenceSession | None = None
    streams: int = 1
    batch_probe: dict[int, float] | None = None
    warmed_up: bool = False
    run_count: int = 0
    image_count: int = 0
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        providers: Literal["auto", "cuda", "cpu"] = "auto",
        intra_op_threads: int = 1,
        allow_spinning: bool = True,
        streams: int = 1,
    ) -> ModelRuntime:
        """Load and validate ``model_dir``; every failure is a :class:`ModelLoadError`.

        ``streams`` > 1 (CPU only) adds a second session over the same graph with
        ``intra_op_threads // streams`` threads, for that many concurrent runs under load
        (see :meth:`run`); on CUDA it is ignored.
        """
        start = time.perf_counter()
        model_dir = Path(model_dir)
        onnx_path, card_path = check_model_folder(model_dir)
        try:
            card = ModelCard.load(card_path)
        except (ValueError, ValidationError) as exc:
            raise ModelLoadError(f"{card_path} is not a valid model card: {exc}") from exc
        sha = file_sha256(onnx_path)
        if sha != card.onnx_sha256:
            raise ModelLoadError(
                f"{onnx_path} has sha256 {sha}, but {card_path.name} says {card.onnx_sha256}: "
                "the card belongs to another export. Re-export the model folder."
            )
        wanted = choose_providers(providers)
        if CUDA in wanted and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls(directory="")
            except Exception:  # pragma: no cover - only with a GPU; ORT reports the real error
                logger.debug("ort.preload_dlls failed", exc_info=True)
        try:
            session = ort.InferenceSession(
                str(onnx_path),
                sess_options=session_options(intra_op_threads, allow_spinning),
                providers=wanted,
            )
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        actual = session.get_providers()
        if providers == "cuda" and CUDA not in actual:
            raise ModelLoadError(
                "CXR_PROVIDERS=cuda, but the CUDA execution provider failed to initialise "
                "(see ONNX Runtime's message above: CUDA/cuDNN libraries or driver)."
            )
        if CUDA in wanted and CUDA not in actual:
            logger.warning("CUDA was requested but failed to initialise; running on CPU")
        validate_graph(session, card)
        stream_session = None
        if streams > 1 and CUDA not in actual:
            stream_session = _stream_session(
                onnx_path, max(1, intra_op_threads // streams), allow_spinning, actual
            )
        runtime = cls(
            model_dir=model_dir,
            card=card,
            session=session,
            requested_providers=wanted,
            intra_op_threads=intra_op_threads,
            load_seconds=time.perf_counter() - start,
            stream_session=stream_session,
            streams=streams if stream_session is not None else 1,
        )
        logger.info(
            "model %s %s loaded from %s in %.2fs; provider %s (requested %s)",
            card.name,
            card.version,
            model_dir,
            runtime.load_seconds,
            runtime.provider,
            wanted,
        )
        return runtime

    @property
    def providers(self) -> list[str]:
        """The providers ORT actually uses, in priority order."""
        return list(self.session.get_providers())

    @property
    def provider(self) -> str:
        return self.providers[0]

    @property
    def device(self) -> Literal["cpu", "cuda"]:
        return "cuda" if self.provider == CUDA else "cpu"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.card.input.height, self.card.input.width)

    def run(self, batch: np.ndarray, *, concurrent: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One session run: ``[N,3,H,W]`` float32 -> logits ``[N,L]``, heatmap ``[N,(L,)h,w]``.

        ``concurrent`` runs on the stream session (fewer threads per run, several runs at once
        under load; a lone request is fastest on all the threads). In the service at c=8 it
        scored 3.14 against 2.90 img/s with one stream (docs/serving.md, Batching).
        """
        session = self.stream_session if concurrent and self.stream_session else self.session
        logits, heatmap = session.run([LOGITS_NAME, HEATMAP_NAME], {INPUT_NAME: batch})
        with self._count_lock:
            self.run_count += 1
            self.image_count += len(batch)
        return logits, heatmap

    def probe_batch_size(self, max_batch: int, tolerance: float = 0.05) -> int:
        """The batch size (1, 2, 4, .. ``max_batch``) that scores an image in the least time
        here, on the session that runs batches under load; the smallest within ``tolerance``.

        A GPU, or a small CNN on CPU, scores many images per run for little more than one; a
        ViT-B/16 on CPU takes as long per image at batch 8 as at batch 1 or longer, and batching
        then only adds queueing. Returns the choice; the ms per image measured for each size stay
        in ``batch_probe``. Sizes stop growing once one is clearly slower per image than the best
        so far.
        """
        sizes = sorted({1, max_batch, *(2**k for k in range(1, 8) if 2**k < max_batch)})
        concurrent = self.stream_session is not None
        per_image: dict[int, float] = {}
        for n in sizes:
            batch = np.zeros((n, *self.input_shape), dtype=np.float32)
            start = time.perf_counter()
            self.run(batch, concurrent=concurrent)
            per_image[n] = round(1000 * (time.perf_counter() - start) / n, 3)
            if per_image[n] > (1 + 2 * tolerance) * min(per_image.values()):
                break
        self.batch_probe = per_image
        chosen = choose_batch_size(per_image, tolerance)
        logger.info("batch size probe (ms per image): %s -> batches of up to %d", per_image, chosen)
        return chosen

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each batch size once (allocations, CUDA kernels) and check the output shapes.

        Output shapes that the graph leaves symbolic are checked here against the card. On CUDA
        every size up to the largest is run, because cuDNN picks its kernels per input shape and
        the first request of an unseen batch size would otherwise pay for the search.
        """
        if self.device == "cuda":
            batch_sizes = tuple(range(1, max(batch_sizes) + 1))
        for n in dict.fromkeys(batch_sizes):
            batch = np.zeros((n, *self.input_shape), dtype=np.float32)
            if self.stream_session is not None:
                self.run(batch, concurrent=True)
            start = time.perf_counter()
            logits, heatmap = self.run(batch)
            if logits.shape != (n, len(self.card.labels)):
                raise ModelLoadError(
                    f"logits came out {logits.shape} for a batch of {n}; "
                    f"expected ({n}, {len(self.card.labels)})"
                )
            rank = 4 if self.card.heatmap_shape == "per_label" else 3
            if heatmap.ndim != rank or heatmap.shape[0] != n:
                want = f"({n}, {len(self.card.labels)}, h, w)" if rank == 4 else f"({n}, h, w)"
                raise ModelLoadError(f"heatmap came out {heatmap.shape}; expected {want}")
            self.heatmap_grid = (int(heatmap.shape[-2]), int(heatmap.shape[-1]))
            logger.info("warm-up batch %d: %.1f ms", n, 1000 * (time.perf_counter() - start))
        self.warmed_up = True
