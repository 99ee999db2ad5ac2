"""int8 model folders for CPU-only hosts: ONNX Runtime's quantisation tools on an exported folder.

``cxr-triage export --quantize int8`` writes, next to the float32 folder, one whose graph has int8
weights behind the same float32 ``pixel_values`` / ``logits`` / ``heatmap`` contract, so the
service loads it like any other folder. Two methods (``auto`` picks by the graph):

- ``dynamic`` (transformers: most of the time is MatMul against weights): weights to int8 once,
  activations quantised per run (``quantize_dynamic``). Only MatMuls whose second input is a
  weight are quantised (``MatMulConstBOnly``), so the attention products and the in-graph
  attention rollout that draws the heatmap stay float32; weights per output channel (a trained
  ViT-B/16: 2.47x at batch 1 against 2.09x per tensor, same fidelity).
- ``static`` (CNNs: most of the time is Conv): QDQ int8 with activation ranges calibrated on real
  images (``quantize_static``, per-channel weights), because ONNX Runtime's dynamic ``Conv``
  (ConvInteger) has no fast CPU kernel.

What it costs is measured and written into the card (``export.quantization``): CPU latency and
throughput of both graphs interleaved on this machine, and on validation images (when given) the
mean AUROC of both and how many screening/diagnosis decisions flip at the card's thresholds.
The thresholds stay the float32 model's: the decision counts say how far they still fit.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from app.card import ExportInfo, ModelCard, QuantizationInfo
from app.inference.runtime import CARD_FILE, ONNX_FILE, file_sha256, session_options
from app.labels import PATHOLOGIES

Method = Literal["auto", "dynamic", "static"]


@dataclass(frozen=True)
class Images:
    """Normalised model inputs ``[N, 3, H, W]`` float32 and, for validation, 0/1 targets
    ``[N, L]`` in the card's label order (without targets: parity and decisions only)."""

    pixels: np.ndarray
    targets: np.ndarray | None = None


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def pick_method(model: onnx.ModelProto) -> Literal["dynamic", "static"]:
    """``static`` when most weights sit in convolutions, ``dynamic`` otherwise (transformers).

    Weights, not node counts: a ViT member has many small MatMuls, so a fold ensemble of CNN
    and ViT members counts more MatMul nodes while its convolutions hold most of the weights.
    """
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    weights = {op: 0 for op in QUANTIZED_OPS}
    for node in model.graph.node:
        if node.op_type in weights and len(node.input) > 1:
            weights[node.op_type] += sizes.get(node.input[1], 0)
    return "static" if weights["Conv"] > weights["MatMul"] + weights["Gemm"] else "dynamic"


def unshare_weights(model: onnx.ModelProto) -> int:
    """Give every Conv/Gemm/MatMul its own copy of a weight that another node also reads.

    ONNX Runtime's quantisers rewrite a weight in place (the dynamic one transposes a ``Gemm``
    weight into int8), so the class-activation ``Einsum`` that reads the same classifier weight
    for the heatmap would get the rewritten tensor and the graph would not load. Returns how
    many copies were made.
    """
    inits = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers[name] = readers.get(name, 0) + 1
    copies = 0
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        for slot, name in enumerate(node.input):
            if readers.get(name, 0) > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}.{node.op_type.lower()}{copies}"
                model.graph.initializer.append(copy)
                node.input[slot] = copy.name
                readers[name] -= 1
                copies += 1
    return copies


class _Reader:
    """``CalibrationDataReader`` over a fixed set of images, in batches of 8."""

    def __init__(self, pixels: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": np.ascontiguousarray(batch)}


def quantize_graph(
    src: Path, dst: Path, method: Literal["dynamic", "static"], calibration: Images | None
) -> None:
    """Write the int8 graph of ``src`` to ``dst`` with ONNX Runtime's quantisation tools."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cxr-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime's docs ask; a graph that the
        # shape inference cannot follow is quantised as exported. ONNX's own shape inference
        # only: the symbolic one declared a wrong heatmap shape (128 for 64) in fold ensembles
        # that mix CNN and ViT members, and the quantised graph then failed to load.
        try:
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        except Exception:
            shutil.copyfile(src, prepped)
        graph = onnx.load(str(prepped))
        if unshare_weights(graph):
            onnx.save(graph, str(prepped))
        if method == "dynamic":
            quantize_dynamic(
                str(prepped),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                extra_options={"MatMulConstBOnly": True},
            )
            return
        if calibration is None or not len(calibration.pixels):
            raise ValueError("static quantisation needs calibration images")
        quantize_static(
            str(prepped),
            str(dst),
            _Reader(calibration.pixels),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(QUANTIZED_OPS),
        )


def _session(path: Path, threads: int) -> ort.InferenceSession:
    # The service's own options, so the figures are what it would see.
    return ort.InferenceSession(
        str(path),
        sess_options=session_options(threads),
        providers=["CPUExecutionProvider"],
    )


def cpu_speed(
    fp32: Path, int8: Path, sample: np.ndarray, threads: int, seconds: float = 10.0
) -> dict[str, float]:
    """Batch-1 latency (median ms, wall and CPU) and batch-8 throughput of both graphs, in
    alternating runs so other load on the machine hits both alike."""
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    one = np.ascontiguousarray(sample[:1])
    eight = np.ascontiguousarray(np.concatenate([sample] * (8 // len(sample) + 1))[:8])
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    thr: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"pixel_values": one})
        s.run(None, {"pixel_values": eight})
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall["int8"]) < 3:
        for key, s in sessions.items():
            t, c = time.perf_counter(), time.process_time()
            s.run(None, {"pixel_values": one})
            wall[key].append(1000 * (time.perf_counter() - t))
            cpu[key].append(1000 * (time.process_time() - c))
            t = time.perf_counter()
            s.run(None, {"pixel_values": eight})
            thr[key].append(8 / (time.perf_counter() - t))
    out = {
        f"{stat}_{key}": statistics.median(values[key])
        for stat, values in (("batch1_ms", wall), ("batch1_cpu_ms", cpu), ("batch8_img_s", thr))
        for key in sessions
    }
    out["runs"] = len(wall["int8"])
    return out


def _probabilities(path: Path, pixels: np.ndarray, threads: int, temperature: float) -> np.ndarray:
    session = _session(path, threads)
    logits = np.concatenate(
        [
            session.run(["logits"], {"pixel_values": np.ascontiguousarray(pixels[i : i + 32])})[0]
            for i in range(0, len(pixels), 32)
        ]
    ).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits / temperature))


def _aurocs(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    out = {}
    for j, label in enumerate(labels):
        y = targets[:, j]
        if label in PATHOLOGIES and 0 < y.sum() < len(y):
            out[label] = float(roc_auc_score(y, probs[:, j]))
    return out


def quantize_folder(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    method: Method = "auto",
    calibration: Images | None = None,
    validation: Images | None = None,
    threads: int | None = None,
    seconds: float = 10.0,
    command: str | None = None,
) -> ModelCard:
    """Quantise the model folder ``src_dir`` into ``out_dir`` and measure what it costs.

    ``calibration`` (static only) and ``validation`` are normalised inputs; without validation
    the card says AUROC and decisions were not measured. Returns the new card.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    card = ModelCard.load(src_dir / CARD_FILE)
    fp32 = src_dir / ONNX_FILE
    chosen = pick_method(onnx.load(str(fp32), load_external_data=False))
    chosen = chosen if method == "auto" else method
    threads = threads or os.cpu_count() or 1
    out_dir.mkdir(parents=True, exist_ok=True)
    int8 = out_dir / ONNX_FILE
    quantize_graph(fp32, int8, chosen, calibration)

    spec = card.input
    sample = (
        validation.pixels[:8]
        if validation is not None
        else np.zeros((8, 3, spec.height, spec.width), np.float32)
    )
    speed = cpu_speed(fp32, int8, sample, threads, seconds)
    info = QuantizationInfo(
        method=chosen,
        source=f"{card.name} {card.version} (sha256 {card.onnx_sha256[:12]})",
        calibration_images=len(calibration.pixels)
        if calibration is not None and chosen == "static"
        else 0,
        cpu_threads=threads,
        batch1_ms_fp32=round(speed["batch1_ms_fp32"], 2),
        batch1_ms_int8=round(speed["batch1_ms_int8"], 2),
        batch1_cpu_ms_fp32=round(speed["batch1_cpu_ms_fp32"], 2),
        batch1_cpu_ms_int8=round(speed["batch1_cpu_ms_int8"], 2),
        batch8_img_s_fp32=round(speed["batch8_img_s_fp32"], 2),
        batch8_img_s_int8=round(speed["batch8_img_s_int8"], 2),
        speedup_batch1=round(speed["batch1_ms_fp32"] / speed["batch1_ms_int8"], 3),
        speedup_batch8=round(speed["batch8_img_s_int8"] / speed["batch8_img_s_fp32"], 3),
        command=command,
    )
    export = ExportInfo(precision="int8", quantization=info)
    summary = (
        f"int8 ({chosen}) quantisation of {info.source}: {info.speedup_batch1:.2f}x faster at "
        f"batch 1 and {info.speedup_batch8:.2f}x at batch 8 on {threads} CPU threads here."
    )
    if max(info.speedup_batch1, info.speedup_batch8) < 1.0:
        # Small models spend their time outside the quantised ops (QDQ overhead dominates).
        summary += " It is slower than float32 here: serve the float32 folder instead."
    if validation is not None:
        temperature = card.calibration.temperature
        p32 = _probabilities(fp32, validation.pixels, threads, temperature)
        p8 = _probabilities(int8, validation.pixels, threads, temperature)
        changed = {}
        for kind in ("screening", "diagnosis"):
            table = getattr(card.thresholds, kind)
            thr = np.array([table[label].threshold for label in card.labels])
            changed[kind] = int(((p32 >= thr) != (p8 >= thr)).sum())
        export.parity_images = len(p32)
        export.max_abs_dprob = float(np.abs(p32 - p8).max())
        info.mean_abs_dprob = round(float(np.abs(p32 - p8).mean()), 5)
        info.fp32_prob_spread = round(float(np.median(p32.std(axis=0))), 5)
        varied = [j for j in range(p32.shape[1]) if p32[:, j].std() > 0 and p8[:, j].std() > 0]
        if varied and len(p32) > 2:
            info.prob_correlation = round(
                float(np.mean([np.corrcoef(p32[:, j], p8[:, j])[0, 1] for j in varied])), 4
            )
        export.decisions_total = 2 * p32.size
        export.decisions_changed = changed
        flips = (
            f"threshold decisions changed: screening {changed['screening']}, diagnosis "
            f"{changed['diagnosis']} of {p32.size} each (thresholds are the fp32 model's); "
            f"|dprob| mean {info.mean_abs_dprob:.3g}, max {export.max_abs_dprob:.3g}, against an "
            f"fp32 spread across images of {info.fp32_prob_spread:.3g} (per-label correlation "
            f"{info.prob_correlation})."
        )
    if validation is not None and validation.targets is not None:
        a32 = _aurocs(validation.targets, p32, card.labels)
        a8 = _aurocs(validation.targets, p8, card.labels)
        info.validation_images = len(p32)
        info.mean_auroc_fp32 = round(float(np.mean(list(a32.values()))), 4) if a32 else None
        info.mean_auroc_int8 = round(float(np.mean(list(a8.values()))), 4) if a8 else None
        if a32:
            info.mean_auroc_delta = round(info.mean_auroc_int8 - info.mean_auroc_fp32, 4)
            info.auroc_delta = {k: round(a8[k] - a32[k], 4) for k in a32}
        summary += (
            f" On {len(p32)} validation images: mean AUROC {info.mean_auroc_fp32} (fp32) vs "
            f"{info.mean_auroc_int8} (int8); {flips}"
        )
    elif validation is not None:
        summary += f" AUROC not measured (images without labels); on {len(p32)} real images {flips}"
    else:
        summary += " AUROC and threshold decisions were not measured (no validation images)."
    new = card.model_copy(
        update={
            "name": f"{card.name}-int8",
            "version": f"{card.version}+int8",
            "onnx_sha256": file_sha256(int8),
            "export": export,
            "limitations": (card.limitations + " " + summary).strip(),
        }
    )
    new.save(out_dir / CARD_FILE)
    ModelCard.load(out_dir / CARD_FILE)
    print(summary)
    print(json.dumps(info.model_dump(exclude_none=True)))
    return new


def images_from_run(run_dir: str | Path, split: str, limit: int | None = None) -> Images:
    """Normalised inputs and targets of a training run's split (its cache, as export uses)."""
    import torch

    from training.augment import Normalizer
    from training.dataset import CachedImages
    from training.evaluate import load_run

    run = load_run(run_dir, device="cpu")
    positions = run.positions(split)[:limit]
    ds = CachedImages(run.cache, positions)
    norm = Normalizer(run.spec["mean"], run.spec["std"], torch.device("cpu"))
    pixels, targets = [], []
    for start in range(0, len(ds), 64):
        images, y = ds.__getitems__(list(range(start, min(start + 64, len(ds)))))
        pixels.append(norm(images).numpy())
        targets.append(y.numpy())
    if not pixels:
        raise ValueError(f"{run_dir} has no {split} images")
    return Images(np.concatenate(pixels).astype(np.float32), np.concatenate(targets))


def images_from_files(files: list[Path], card: ModelCard) -> Images:
    """Calibration inputs from image files through the service's own decode + preprocess."""
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import to_model_input

    return Images(
        np.stack([to_model_input(decode_image(f.read_bytes()).pixels, card.input) for f in files])
    )
