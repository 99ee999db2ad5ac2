"""Export a run to the serving model folder: ``model.onnx`` + ``model_card.json``.

The graph takes ``pixel_values`` float32 [N, 3, H, W] (dynamic N) and returns ``logits`` [N, L]
and ``heatmap`` [N, h, w] in [0, 1]. It is exported with the TorchScript-based exporter
(``dynamo=False``): it traces the attention-rollout hooks and the CAM einsum into plain ONNX ops
without the torch.export guards the dynamo exporter raises on timm's shape assertions. The export
is then checked against torch on real validation images at two batch sizes: if the probabilities
or the heatmap differ by more than ``atol`` (1e-4), export fails and no model folder is written.
"""

from __future__ import annotations

import copy
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

from app.card import (
    Calibration,
    ExportInfo,
    InputSpec,
    ModelCard,
    SplitMetrics,
    Thresholds,
    TrainingInfo,
)
from app.labels import PATHOLOGIES
from training.augment import Normalizer
from training.dataset import CachedImages
from training.evaluate import LoadedRun, evaluate_run, load_run
from training.trainer import git_commit
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


class HalfPrecision(torch.nn.Module):
    """The model in float16 behind float32 inputs and outputs (the DESIGN.md graph contract).

    Halves the file and, on GPUs with fp16 tensor cores, the latency; the cast to float32
    happens inside the graph, so the service feeds and reads float32 as before.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).half().eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, heat = self.module(x.half())
        return logits.float(), heat.float()


def decision_parity(
    onnx_path: Path,
    run: LoadedRun,
    reference_logits: np.ndarray,
    thresholds: dict[str, Any],
    temperature: float,
    *,
    batch_size: int = 64,
) -> ExportInfo:
    """Run the graph on every validation image and count threshold decisions that flip.

    ``reference_logits`` are the float32 torch model's on the same images (RUN/eval cache); a
    max |dp| of 1e-3 says little on its own, the flags a reader acts on are what count.
    """
    import onnxruntime as ort

    from training.calibration import sigmoid

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ds = CachedImages(run.cache, run.positions("val"))
    norm = Normalizer(run.spec["mean"], run.spec["std"], torch.device("cpu"))
    out = []
    for start in range(0, len(ds), batch_size):
        images, _ = ds.__getitems__(list(range(start, min(start + batch_size, len(ds)))))
        out.append(session.run(["logits"], {"pixel_values": norm(images).numpy()})[0])
    logits = np.concatenate(out) if out else np.zeros_like(reference_logits)
    p_ref, p_new = sigmoid(reference_logits, temperature), sigmoid(logits, temperature)
    changed = {}
    for kind in ("screening", "diagnosis"):
        thr = np.array([thresholds[kind][name]["threshold"] for name in run.labels])
        changed[kind] = int(((p_ref >= thr) != (p_new >= thr)).sum())
    return ExportInfo(
        parity_images=len(ds),
        max_abs_dprob=float(np.abs(p_ref - p_new).max()) if len(ds) else None,
        decisions_total=2 * p_ref.size,
        decisions_changed=changed,
    )


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
        lr=run.summary.get("lr", cfg.lr),
        base_lr=cfg.base_lr,
        global_batch=run.summary.get("global_batch"),
        ema_decay=cfg.ema_decay,
        label_smoothing=cfg.label_smoothing,
        checkpoint_loaded_fraction=(run.summary.get("checkpoint_load") or {}).get(
            "loaded_backbone_fraction"
        ),
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
    temperature = val.get("calibration", {}).get("temperature", 1.0)
    if temperature != 1.0:
        default_limits.append(
            f"Probabilities are sigmoid(logit / {temperature:.4g}): one temperature fitted on the "
            "validation split (it leaves AUROC unchanged); the thresholds are on these calibrated "
            "probabilities. Calibration on other sites is unknown."
        )
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
            {k: v for k, v in thresholds.items() if k not in ("unfitted", "temperature")}
        ),
        metrics=metrics,
        training=training,
        intended_use=intended_use or INTENDED_USE,
        limitations=limitations or " ".join(default_limits),
        calibration=_calibration(val, test),
    )


def _calibration(val: dict[str, Any], test: dict[str, Any] | None) -> Calibration:
    """The card's calibration block: T from validation, ECE before/after on val (and test)."""
    cal = dict(val["calibration"])
    before, after = dict(cal["ece_before"]), dict(cal["ece_after"])
    if test is not None:
        before.update(test["calibration"]["ece_before"])
        after.update(test["calibration"]["ece_after"])
    return Calibration(
        method=cal["method"],
        temperature=cal["temperature"],
        fitted_on=cal["fitted_on"],
        ece_bins=cal["ece_bins"],
        ece_before=before,
        ece_after=after,
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
    device: str = "auto",
    fp16: bool = False,
    fp16_atol: float = 1e-2,
    calibrate: bool = True,
) -> ModelCard:
    """Evaluate val (+ test) on ``device``, export on CPU, check parity, write the model folder.

    With ``fp16`` the float32 graph is exported and checked first, then the float16 one; it
    must stay within ``fp16_atol`` of torch on the parity images, and the number of threshold
    decisions it changes on all validation images goes to the card's ``export`` block.
    """
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
        "calibrate": calibrate,
    }
    val = evaluate_run(run.run_dir, split="val", **common)
    test = evaluate_run(run.run_dir, split="test", **common) if len(run.positions("test")) else None
    run.model.cpu()
    module = with_heatmap(run.model, run.labels).eval()
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        size = (run.spec["height"], run.spec["width"])
        export_onnx(module, onnx_path, size=size, opset=opset)
        check_parity(module, onnx_path, parity_inputs(run), atol=atol)
        if fp16:
            from training.evaluate import split_logits

            export_onnx(HalfPrecision(module), onnx_path, size=size, opset=opset)
            check_parity(module, onnx_path, parity_inputs(run), atol=fp16_atol)
            temperature = val["calibration"]["temperature"]
            reference, _ = split_logits(run, "val", batch_size=batch_size, progress=False)
            export_info = decision_parity(
                onnx_path, run, reference, val["thresholds"], temperature, batch_size=batch_size
            )
            export_info.precision = "fp16"
            print(
                f"fp16 vs fp32 on {export_info.parity_images} validation images: max |dprob| "
                f"{export_info.max_abs_dprob:.2e}; threshold decisions changed: "
                + ", ".join(f"{k} {v}" for k, v in export_info.decisions_changed.items())
                + f" of {export_info.decisions_total // 2} each"
            )
        else:
            export_info = ExportInfo(precision="fp32")
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
    card.export = export_info
    card.save(out_dir / "model_card.json")
    ModelCard.load(out_dir / "model_card.json")
    log.info(
        "wrote %s (model.onnx %.1f MB, card)",
        out_dir,
        (out_dir / "model.onnx").stat().st_size / 1e6,
    )
    return card


CV_LIMITATIONS = (
    "Trained from scratch on the {n} shared NIH ChestX-ray14 images ({patients} patients); NIH "
    "labels were mined from radiology reports by NLP and are noisy, so AUROC is measured against "
    "imperfect labels. NIH ChestX-ray14 comes from one US hospital; performance on other sites, "
    "scanners, paediatric or lateral images is unknown. The AUROC figures (metrics.validation) "
    "are out-of-fold: each image scored by the fold model that never saw its patient, CI from a "
    "patient-level bootstrap, and the logits of several CV runs (architectures) averaged as "
    "the graph averages them; the shipped graph averages {members} fold models ({k} per run), "
    "each of which saw {seen}% of the patients. Thresholds were fitted on those out-of-fold "
    "probabilities; their sensitivity/specificity are out-of-fold figures. Heatmaps are "
    "per-label class activation maps on an {grid} grid of a 64 px input, min-max scaled per "
    "image: they show where, relative to the rest of the image, the model found evidence for "
    "that finding, not where a finding is."
)


def load_cv_members(cv_dirs: list[Path]) -> tuple[list[torch.nn.Module], dict[str, Any], list[str]]:
    """The fold models of one or more CV folders (same arch and input), eval mode, on CPU."""
    from training.zoo import create_model, per_label_module

    members: list[torch.nn.Module] = []
    spec: dict[str, Any] | None = None
    labels: list[str] | None = None
    for cv_dir in cv_dirs:
        paths = sorted(cv_dir.glob("fold*/model.pt"))
        if not paths:
            raise FileNotFoundError(f"{cv_dir} has no fold*/model.pt; run `cxr-triage crossval`")
        for path in paths:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            if spec is not None and (ck["spec"] != spec or ck["labels"] != labels):
                raise ValueError(f"{path}: another input spec or label list than the others")
            spec, labels = ck["spec"], list(ck["labels"])
            cfg = ck["config"]
            model = create_model(
                ck["arch"],
                num_classes=len(labels),
                img_size=cfg["image_size"],
                drop_rate=cfg.get("drop_rate"),
                drop_path_rate=cfg.get("drop_path_rate"),
            )
            model.load_state_dict(ck["model"])
            members.append(per_label_module(model.eval()))
    assert spec is not None and labels is not None
    return members, spec, labels


def export_cv(
    cv_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "0.2.0",
    opset: int = OPSET,
    atol: float = 1e-4,
    n_boot: int = 1000,
    target_sensitivity: float = 0.95,
    diagnosis_method: str = "youden",
    intended_use: str | None = None,
    limitations: str | None = None,
    roc_png: str | Path | None = None,
) -> ModelCard:
    """Export the fold models of ``cv_dirs`` as one averaging graph with a card from out of fold.

    Several CV folders (same folds, other training seeds) are averaged member by member; their
    out-of-fold logits are averaged the same way, so the card's AUROC and thresholds describe
    predictions made without the image's patient, by as many models per image as the graph has
    per fold.
    """
    from training.crossval import load_oof, sigmoid
    from training.metrics import auroc_table, fit_thresholds
    from training.zoo import FoldEnsemble

    dirs = [Path(d) for d in cv_dirs]
    oofs = [load_oof(d) for d in dirs]
    for d, o in zip(dirs, oofs, strict=True):
        if not np.array_equal(o["folds"], oofs[0]["folds"]):
            raise ValueError(f"{d} was cross-validated on other folds than {dirs[0]}")
    oof = oofs[0]
    cfg = oof["config"]
    members, spec, labels = load_cv_members(dirs)
    module = FoldEnsemble(members).eval()
    targets, groups = oof["targets"], oof["groups"]
    probs = sigmoid(np.mean([o["logits"] for o in oofs], axis=0))
    k = len(np.unique(oof["folds"]))
    thresholds = fit_thresholds(
        targets,
        probs,
        labels,
        target_sensitivity=target_sensitivity,
        diagnosis_method=diagnosis_method,
    )
    thresholds["chosen_on"] = f"out-of-fold predictions ({k}-fold patient-wise CV)"
    table = auroc_table(targets, probs, labels, n_boot=n_boot, groups=groups)
    out_dir = Path(out_dir)
    cache = oof["cache"]
    parity = np.linspace(0, len(cache.index) - 1, 6).astype(int)
    images, _ = CachedImages(cache, parity).__getitems__(list(range(len(parity))))
    inputs = Normalizer(spec["mean"], spec["std"], torch.device("cpu"))(images)
    n_params = sum(p.numel() for p in module.parameters())
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(module, onnx_path, size=(spec["height"], spec["width"]), opset=opset)
        check_parity(module, onnx_path, inputs, atol=atol)
        with torch.inference_mode():
            grid = tuple(module(inputs[:1])[1].shape[-2:])
        n_patients = len(np.unique(groups))
        training = TrainingInfo(
            source="NIH ChestX-ray14" + (f" ({Path(cfg.labels).name})" if cfg.labels else ""),
            split=f"{k}-fold patient-wise cross-validation (scikit-learn StratifiedGroupKFold, "
            f"stratified on each image's rarest label, fold seed in {dirs[0]}/folds.csv); "
            "metrics.validation are the out-of-fold predictions; no image chose an epoch "
            "(fixed schedule, last epoch kept)",
            image_counts={"all": len(targets)},
            patient_counts={"all": int(n_patients)},
            epochs=cfg.epochs,
            seed=cfg.seed,
            commit=git_commit(),
            folds=k,
            members=len(members),
            member_seeds=[o["config"].seed for o in oofs],
            member_archs=[o["config"].arch for o in oofs],
            cv_runs=[str(d) for d in dirs],
            ensemble="mean of the fold models' logits and raw class activation maps",
            initialisation="random initialisation (from scratch)",
            parameters=n_params,
            loss=cfg.loss,
            sampler=cfg.sampler,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
        )
        card = ModelCard(
            name=name or out_dir.name,
            version=version,
            created=datetime.now(timezone.utc),
            architecture=" + ".join(f"{o['config'].arch} x{k}" for o in oofs) + " (fold ensemble)",
            onnx_sha256=sha256_file(onnx_path),
            labels=labels,
            input=InputSpec(**spec),
            heatmap_method=module.method,
            heatmap_shape=module.shape,
            thresholds=Thresholds.model_validate(
                {k2: v for k2, v in thresholds.items() if k2 != "unfitted"}
            ),
            metrics={"validation": _split_metrics({"metrics": table})},
            training=training,
            intended_use=intended_use or INTENDED_USE,
            limitations=limitations
            or CV_LIMITATIONS.format(
                n=len(targets),
                patients=n_patients,
                k=k,
                members=len(members),
                seen=round(100 * (k - 1) / k),
                grid="x".join(map(str, grid)),
            ),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(onnx_path), out_dir / "model.onnx")
    card.save(out_dir / "model_card.json")
    ModelCard.load(out_dir / "model_card.json")
    if roc_png:
        from training.evaluate import plot_roc

        Path(roc_png).parent.mkdir(parents=True, exist_ok=True)
        plot_roc(
            targets,
            probs,
            labels,
            table,
            Path(roc_png),
            f"{card.name} {card.version}: out-of-fold ROC ({len(targets)} images)",
        )
    log.info(
        "wrote %s (model.onnx %.1f MB, %d members, card)",
        out_dir,
        (out_dir / "model.onnx").stat().st_size / 1e6,
        len(members),
    )
    return card
