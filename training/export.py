"""Export a run to the serving model folder: ``model.onnx`` + ``model_card.json``.

The graph takes ``pixel_values`` float32 [N, 3, H, W] (dynamic N) and returns ``logits`` [N, L]
and ``heatmap`` [N, h, w] in [0, 1]. It is exported with the TorchScript-based exporter
(``dynamo=False``): it traces the attention-rollout hooks and the CAM einsum into plain ONNX ops
without the torch.export guards the dynamo exporter raises on timm's shape assertions. The export
is then checked against torch on real validation images at two batch sizes: if the probabilities
or the heatmap differ by more than ``atol`` (1e-4), export fails and no model folder is written.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.card import InputSpec, ModelCard, SplitMetrics, Thresholds, TrainingInfo
from app.labels import PATHOLOGIES
from training.augment import Normalizer
from training.dataset import CachedImages
from training.evaluate import LoadedRun, evaluate_run, load_run
from training.zoo import with_heatmap

log = logging.getLogger(__name__)
OPSET = 17

INTENDED_USE = (
    "Research and engineering use: ranking frontal chest radiographs for review and exercising "
    "the cxr-triage service. Outputs are per-finding probabilities for the 14 NIH ChestX-ray14 "
    "pathologies and 'No Finding', screening/diagnosis flags at thresholds chosen on validation "
    "data, and a coarse attention heatmap. Not a medical device; not for clinical decisions."
)


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the torch model within tolerance."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(module: torch.nn.Module, path: Path, *, size: tuple[int, int], opset: int) -> None:
    dummy = torch.zeros(2, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from timm's shape asserts, deprecation
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits", "heatmap"],
            dynamic_axes={"pixel_values": {0: "N"}, "logits": {0: "N"}, "heatmap": {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(path))


def parity_inputs(run: LoadedRun, n: int = 6) -> torch.Tensor:
    """Real normalised images (validation first), the inputs serving will actually see."""
    positions = np.concatenate([run.positions("val"), run.positions("train")])[:n]
    images, _ = CachedImages(run.cache, positions).__getitems__(list(range(len(positions))))
    return Normalizer(run.spec["mean"], run.spec["std"], torch.device("cpu"))(images)


def check_parity(
    module: torch.nn.Module, onnx_path: Path, inputs: torch.Tensor, *, atol: float = 1e-4
) -> dict[str, float]:
    """Max |delta| of sigmoid probabilities and heatmap, ONNX Runtime vs torch, at batch 1 and N."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = {"probabilities": 0.0, "heatmap": 0.0}
    for batch in (inputs[:1], inputs):
        with torch.inference_mode():
            logits, heat = module(batch)
        o_logits, o_heat = session.run(["logits", "heatmap"], {"pixel_values": batch.numpy()})
        if o_logits.shape != tuple(logits.shape) or o_heat.shape != tuple(heat.shape):
            raise ParityError(
                f"ONNX output shapes {o_logits.shape}, {o_heat.shape} differ from "
                f"torch {tuple(logits.shape)}, {tuple(heat.shape)}"
            )
        d_prob = np.abs(1 / (1 + np.exp(-o_logits)) - torch.sigmoid(logits).numpy()).max()
        d_heat = np.abs(o_heat - heat.numpy()).max()
        worst["probabilities"] = max(worst["probabilities"], float(d_prob))
        worst["heatmap"] = max(worst["heatmap"], float(d_heat))
        if o_heat.min() < 0 or o_heat.max() > 1:
            raise ParityError(f"heatmap leaves [0, 1]: {o_heat.min()}..{o_heat.max()}")
    print(
        f"parity ONNX vs torch: max |dprob| {worst['probabilities']:.2e}, "
        f"max |dheatmap| {worst['heatmap']:.2e} (tolerance {atol:.0e})"
    )
    if max(worst.values()) > atol:
        raise ParityError(f"ONNX export differs from torch by more than {atol}: {worst}")
    return worst


def _split_metrics(result: dict[str, Any]) -> SplitMetrics:
    m = {k: v for k, v in result["metrics"].items() if k not in ("skipped", "mean_over")}
    return SplitMetrics.model_validate(m)


def build_card(
    run: LoadedRun,
    *,
    name: str,
    version: str,
    onnx_sha256: str,
    heatmap_method: str,
    heatmap_shape: str = "per_image",
    val: dict[str, Any],
    test: dict[str, Any] | None,
    intended_use: str | None = None,
    limitations: str | None = None,
) -> ModelCard:
    thresholds = val["thresholds"]
    counts = run.summary.get("splits", {})
    metrics = {"validation": _split_metrics(val)}
    if test is not None:
        metrics["test"] = _split_metrics(test)
    cfg = run.cfg
    split_text = (
        "official NIH test list as test; validation = seeded patient-disjoint "
        f"{cfg.val_fraction:.0%} of train_val patients (seed {cfg.seed})"
        if cfg.split == "official"
        else f"seeded patient-disjoint carve-outs: test {cfg.test_fraction:.0%}, validation "
        f"{cfg.val_fraction:.0%} of patients (seed {cfg.seed})"
    )
    init = (
        "checkpoint " + Path(cfg.checkpoint).name
        if cfg.checkpoint
        else (
            "timm pretrained weights" if cfg.pretrained else "random initialisation (from scratch)"
        )
    )
    training = TrainingInfo(
        source="NIH ChestX-ray14" + (f" ({Path(cfg.labels).name})" if cfg.labels else ""),
        split=split_text,
        image_counts={k: v["images"] for k, v in counts.items()},
        epochs=run.summary.get("epochs_completed"),
        seed=cfg.seed,
        commit=run.summary.get("commit"),
        patient_counts={k: v["patients"] for k, v in counts.items()},
        best_epoch=run.summary.get("best_epoch"),
        initialisation=init,
        parameters=run.summary.get("parameters"),
        loss=cfg.loss,
        sampler=cfg.sampler,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        world_size=run.summary.get("world_size"),
    )
    n_train = training.image_counts.get("train", 0)
    default_limits = [
        f"Trained on {n_train} images ({init}); NIH labels were mined from radiology reports by "
        "NLP and are noisy, so AUROC is measured against imperfect labels.",
        "NIH ChestX-ray14 comes from one US hospital; performance on other sites, scanners, "
        "paediatric or lateral images is unknown.",
        "Heatmaps show where the model looked, not where a finding is.",
        "Positive means probability >= threshold; thresholds were chosen on the validation split "
        "and their sensitivity/specificity are validation figures.",
    ]
    unfitted = thresholds.get("unfitted", [])
    if unfitted:
        default_limits.append(
            "No validation positives for " + ", ".join(unfitted) + ": their thresholds are a "
            "0.5 placeholder with unknown sensitivity."
        )
    skipped = [lbl for lbl in val["metrics"]["skipped"] if lbl in PATHOLOGIES]
    if skipped:
        default_limits.append("Validation AUROC undefined for " + ", ".join(skipped) + ".")
    return ModelCard(
        name=name,
        version=version,
        created=datetime.now(timezone.utc),
        architecture=cfg.arch,
        onnx_sha256=onnx_sha256,
        labels=run.labels,
        input=InputSpec(**run.spec),
        heatmap_method=heatmap_method,
        heatmap_shape=heatmap_shape,
        thresholds=Thresholds.model_validate(
            {k: v for k, v in thresholds.items() if k != "unfitted"}
        ),
        metrics=metrics,
        training=training,
        intended_use=intended_use or INTENDED_USE,
        limitations=limitations or " ".join(default_limits),
    )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    opset: int = OPSET,
    atol: float = 1e-4,
    n_boot: int = 1000,
    target_sensitivity: float = 0.95,
    diagnosis_method: str = "youden",
    batch_size: int = 64,
    intended_use: str | None = None,
    limitations: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> ModelCard:
    """Evaluate val (+ test) on ``device``, export on CPU, check parity, write the model folder."""
    if opset < 17:
        raise ValueError("opset must be >= 17")
    run = load_run(run_dir, device=device)
    out_dir = Path(out_dir)
    common = {
        "n_boot": n_boot,
        "target_sensitivity": target_sensitivity,
        "diagnosis_method": diagnosis_method,
        "batch_size": batch_size,
        "progress": progress,
        "run": run,
    }
    val = evaluate_run(run.run_dir, split="val", **common)
    test = evaluate_run(run.run_dir, split="test", **common) if len(run.positions("test")) else None
    run.model.cpu()
    module = with_heatmap(run.model, run.labels).eval()
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(module, onnx_path, size=(run.spec["height"], run.spec["width"]), opset=opset)
        check_parity(module, onnx_path, parity_inputs(run), atol=atol)
        card = build_card(
            run,
            name=name or out_dir.name,
            version=version,
            onnx_sha256=sha256_file(onnx_path),
            heatmap_method=module.method,
            heatmap_shape=module.shape,
            val=val,
            test=test,
            intended_use=intended_use,
            limitations=limitations,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(onnx_path), out_dir / "model.onnx")
    card.save(out_dir / "model_card.json")
    ModelCard.load(out_dir / "model_card.json")
    log.info(
        "wrote %s (model.onnx %.1f MB, card)",
        out_dir,
        (out_dir / "model.onnx").stat().st_size / 1e6,
    )
    return card
