"""End to end on real NIH images: train (CLI), resume, evaluate, export to ONNX, 2-process DDP.

Tiny settings (64 px images, vit-v1 / the small CNN, a few steps, one thread) keep the whole file
to well under a minute on two CPU cores; the models learn little, but every contract is real:
the model folder is loaded by the service's own runtime.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.card import ModelCard
from app.labels import NIH_LABELS
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--image-size",
    "64",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
    "--batch-size",
    "32",
    "--lr",
    "1e-3",
    "--warmup-epochs",
    "0.5",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def labels_csv(nih_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 shared nih-64 rows (both official splits), paths relative to the nih folder."""
    raw = pd.read_csv(nih_dir / "labels.csv")
    rows = raw[raw["subset"] == "nih-64"].head(400)
    assert set(rows["official_split"]) == {"train_val", "test"}
    path = tmp_path_factory.mktemp("labels") / "subset.csv"
    rows.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def vit_run(labels_csv: Path, nih_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's command: train --arch vit-v1 --labels CSV --image-root DIR ... --out RUN."""
    run = tmp_path_factory.mktemp("runs") / "vit"
    status = main(
        [
            "train",
            "--arch",
            "vit-v1",
            "--labels",
            str(labels_csv),
            "--image-root",
            str(nih_dir),
            "--epochs",
            "4",
            "--out",
            str(run),
            "--cache-workers",
            "1",
            *TINY,
        ]
    )
    assert status == 0
    return run


def test_training_loss_falls_and_best_weights_are_kept(vit_run: Path) -> None:
    steps = _rows(vit_run / "train_steps.csv")
    by_epoch = pd.DataFrame(steps).astype(float).groupby("epoch")["loss"].mean()
    assert len(by_epoch) == 4
    assert by_epoch.iloc[-1] < by_epoch.iloc[0] * 0.8
    summary = json.loads((vit_run / "run.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_completed"] == 4
    epochs = _rows(vit_run / "metrics.csv")
    best = max(epochs, key=lambda r: float(r["val_mean_auroc"]))
    assert summary["best_epoch"] == int(best["epoch"])
    assert summary["best_val_mean_auroc"] == pytest.approx(float(best["val_mean_auroc"]))
    splits = pd.read_csv(vit_run / "splits.csv", dtype=str)
    groups = splits.groupby("patient_id")["split"].nunique()
    assert (groups == 1).all()
    assert summary["splits"]["test"]["images"] == int((splits["split"] == "test").sum()) > 0


def test_run_weights_load_as_a_checkpoint(vit_run: Path) -> None:
    import torch

    from training.zoo import create_model

    best = torch.load(vit_run / "best.pt", weights_only=True)["model"]
    model = create_model("vit-v1", num_classes=15, img_size=64, checkpoint=str(vit_run / "best.pt"))
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_resume_continues_with_the_same_next_step_loss(vit_run: Path, tmp_path: Path) -> None:
    cache = [
        "--cache",
        str(vit_run / "cache"),
        "--arch",
        "vit-v2",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "3",
        *TINY,
    ]
    assert main(["train", *cache, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *cache, "--out", str(tmp_path / "b"), "--stop-after-epoch", "1"]) == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "paused"
    assert len(_rows(tmp_path / "b" / "train_steps.csv")) == 3
    assert main(["train", "--resume", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = _rows(tmp_path / "a" / "train_steps.csv"), _rows(tmp_path / "b" / "train_steps.csv")
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5", "6"]
    # vit-v2 has dropout and drop-path: equality needs the RNG, sampler and schedule restored
    assert float(b[3]["loss"]) == pytest.approx(float(a[3]["loss"]), rel=1e-6, abs=1e-7)
    assert [float(r["loss"]) for r in b] == pytest.approx([float(r["loss"]) for r in a], rel=1e-5)
    assert main(["train", *cache, "--out", str(tmp_path / "a")]) == 2  # refuses to overwrite


def test_evaluate_writes_metrics_roc_and_val_thresholds(vit_run: Path) -> None:
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(vit_run),
                "--split",
                "val",
                "--bootstrap",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((vit_run / "eval" / "val.json").read_text())
    thresholds = json.loads((vit_run / "eval" / "thresholds.json").read_text())
    assert (vit_run / "eval" / "val_roc.png").read_bytes()[:4] == b"\x89PNG"
    per_label = result["metrics"]["per_label"]
    assert list(per_label) == list(NIH_LABELS)
    for name in NIH_LABELS:
        screening = thresholds["screening"][name]
        if name in thresholds["unfitted"]:
            assert screening["sensitivity"] is None
        else:  # on the data they were fitted on, thresholds reach the target
            assert screening["sensitivity"] >= 0.95
            assert result["operating_points"]["screening"][name]["sensitivity"] >= 0.95


def _check_model_folder(model_dir: Path, run: Path, grid: tuple[int, int], method: str) -> None:
    import onnxruntime as ort

    from app.imaging.decode import decode_image
    from app.imaging.preprocess import to_model_input
    from app.inference.runtime import ModelRuntime

    card = ModelCard.load(model_dir / "model_card.json")
    assert card.heatmap_method == method
    assert card.labels == list(NIH_LABELS)
    assert set(card.metrics) == {"validation", "test"}
    assert card.metrics["validation"].mean_auroc is not None
    assert card.training.image_counts == {
        k: v["images"] for k, v in json.loads((run / "run.json").read_text())["splits"].items()
    }
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    shape = session.get_inputs()[0].shape
    assert session.get_inputs()[0].name == "pixel_values" and isinstance(shape[0], str)
    runtime = ModelRuntime.load(model_dir, providers="cpu")  # the service's own loader
    files = pd.read_csv(run / "splits.csv")["file"].head(3)
    batch = np.stack(
        [to_model_input(decode_image(Path(f).read_bytes()).pixels, card.input) for f in files]
    )
    logits, heatmap = runtime.run(batch)
    per_label = (len(NIH_LABELS),) if card.heatmap_shape == "per_label" else ()
    assert logits.shape == (3, len(NIH_LABELS)) and heatmap.shape == (3, *per_label, *grid)
    assert heatmap.min() >= 0 and heatmap.max() <= 1


def test_export_vit_with_attention_rollout(
    vit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vit-model"
    assert (
        main(
            [
                "export",
                "--run",
                str(vit_run),
                "--out",
                str(out),
                "--bootstrap",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "max |dprob|" in printed and "max |dheatmap|" in printed
    _check_model_folder(out, vit_run, (2, 2), "attention_rollout")


def test_parity_check_fails_for_a_different_model(tmp_path: Path) -> None:
    import torch

    from training.export import ParityError, check_parity, export_onnx
    from training.zoo import create_model, with_heatmap

    torch.manual_seed(0)
    exported = with_heatmap(create_model("vit-v1", num_classes=15, img_size=64), NIH_LABELS)
    other = with_heatmap(create_model("vit-v1", num_classes=15, img_size=64), NIH_LABELS)
    export_onnx(exported.eval(), tmp_path / "m.onnx", size=(64, 64), opset=17)
    x = torch.randn(3, 3, 64, 64)
    assert max(check_parity(exported, tmp_path / "m.onnx", x).values()) < 1e-5
    with pytest.raises(ParityError):
        check_parity(other.eval(), tmp_path / "m.onnx", x)


def test_ddp_two_processes_on_gloo_then_cam_export(vit_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training.cli",
        "train",
        "--arch",
        "cnn",
        "--cache",
        str(vit_run / "cache"),
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "3",
        "--out",
        str(run),
        *TINY,
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6
    epochs = _rows(run / "metrics.csv")
    n_val = summary["splits"]["val"]["images"]
    assert all(int(r["val_images"]) == n_val for r in epochs)  # both shards gathered
    out = tmp_path / "cnn-model"
    assert (
        main(["export", "--run", str(run), "--out", str(out), "--bootstrap", "20", "--no-progress"])
        == 0
    )
    card = ModelCard.load(out / "model_card.json")
    # single-process evaluation of best.pt reproduces the AUROC the two ranks computed together
    assert card.metrics["validation"].mean_auroc == pytest.approx(
        summary["best_val_mean_auroc"], abs=1e-6
    )
    _check_model_folder(out, run, (2, 2), "cam")
    assert ModelCard.load(out / "model_card.json").heatmap_shape == "per_label"
