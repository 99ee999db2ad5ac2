"""Patient-wise k-fold CV, the fold-ensemble export and the pointing game, on real shared images.

A small real run (150 shared 64 px NIH images, including the 9 with NIH boxes; 3 folds of 2
epochs) goes through the same code as the shipped model's: folds, out-of-fold scoring, the
averaging ONNX graph with its card, the service's loader, and the localisation benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.card import ModelCard
from app.labels import NIH_LABELS
from tests.conftest import REPO_ROOT

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def labels_table(nih_dir: Path) -> pd.DataFrame:
    from training.data import read_labels

    return read_labels(nih_dir / "labels.csv")


def test_folds_are_patient_disjoint_and_cover_every_image(labels_table: pd.DataFrame) -> None:
    from training.crossval import assign_folds

    folds = assign_folds(labels_table, 5, seed=0)
    assert set(folds) == set(range(5))
    per_patient = pd.Series(folds).groupby(labels_table["patient_id"].to_numpy()).nunique()
    assert per_patient.max() == 1  # no patient in two folds
    sizes = np.bincount(folds)
    assert sizes.min() > 0.1 * len(folds)
    # stratification: each fold holds some of every label with at least 10 positives overall
    targets = labels_table[list(NIH_LABELS)].to_numpy()
    for i, name in enumerate(NIH_LABELS):
        if targets[:, i].sum() >= 10:
            assert all(targets[folds == k, i].sum() > 0 for k in range(5)), name
    np.testing.assert_array_equal(folds, assign_folds(labels_table, 5, seed=0))


@pytest.fixture(scope="module")
def small_cv(labels_table: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.cache import build_cache
    from training.config import TrainConfig
    from training.crossval import run_crossval

    root = tmp_path_factory.mktemp("cv")
    small = labels_table[labels_table["file"].str.contains("nih-64")]
    boxed = small[small["file"].str.contains("|".join(_boxed_names(labels_table)))]
    table = pd.concat([boxed, small.drop(boxed.index).head(141)])
    build_cache(table, root / "cache", size=64, interpolation="bicubic", workers=1, progress=False)
    cfg = TrainConfig(
        cache=str(root / "cache"),
        image_size=64,
        interpolation="bicubic",
        arch="cnn-s8",
        epochs=2,
        batch_size=32,
        lr=1e-3,
        warmup_epochs=0.5,
        loss="wbce",
        device="cpu",
        threads=1,
        progress=False,
        tensorboard=False,
        out=str(root / "run"),
    )
    summary = run_crossval(cfg, root / "run", k=3, fold_seed=0, n_boot=200)
    assert summary  # every fold trained
    return root / "run"


def _boxed_names(labels_table: pd.DataFrame) -> list[str]:
    boxes = pd.read_csv(
        Path(labels_table["file"].iloc[0]).parents[2] / "metadata" / "BBox_List_2017.csv"
    )
    names = set(boxes["Image Index"])
    return [Path(f).name for f in labels_table["file"] if Path(f).name in names]


def test_crossval_scores_every_image_out_of_fold(small_cv: Path) -> None:
    summary = json.loads((small_cv / "summary.json").read_text())
    logits = np.load(small_cv / "oof_logits.npy")
    folds = pd.read_csv(small_cv / "folds.csv", dtype={"patient_id": str})
    assert logits.shape == (150, len(NIH_LABELS)) and np.isfinite(logits).all()
    assert summary["images"] == 150 and summary["folds"] == 3
    assert summary["bootstrap_unit"] == "patient"
    lo, hi = summary["oof_mean_auroc_ci"]
    assert lo <= summary["oof_mean_auroc"] <= hi
    assert summary["by_source"]["64px"]["images"] == 150  # all from the 64 px subset here
    assert summary["by_source"]["larger"] == {"images": 0, "mean_auroc": None}
    assert sum(f["images"] for f in summary["per_fold"].values()) == 150
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    for k in range(3):
        assert (small_cv / f"fold{k}" / "model.pt").is_file()


def test_fold_ensemble_export_serves_with_out_of_fold_card(small_cv: Path, tmp_path: Path) -> None:
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import to_model_input
    from app.inference.runtime import ModelRuntime
    from training.crossval import load_oof, sigmoid
    from training.export import export_cv

    out = tmp_path / "model"
    card = export_cv([small_cv], out, name="cvtest", n_boot=100, roc_png=tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert card.heatmap_shape == "per_label" and card.heatmap_method == "cam"
    assert card.training.model_extra["members"] == 3
    assert "out-of-fold" in card.thresholds.chosen_on
    oof = load_oof(small_cv)
    probs = sigmoid(oof["logits"])
    # thresholds were fitted on the out-of-fold probabilities: there they reach the target
    for i, name in enumerate(card.labels):
        y = oof["targets"][:, i]
        if 0 < y.sum() < len(y):
            thr = card.thresholds.screening[name].threshold
            assert (probs[y == 1, i] >= thr).mean() >= 0.95, name
    assert card.metrics["validation"].n_images == 150
    assert card.metrics["validation"].bootstrap_unit == "patient"
    runtime = ModelRuntime.load(out, providers="cpu")  # the service's own checks
    runtime.warm_up((1, 2))
    assert runtime.heatmap_grid == (8, 8)
    files = list(oof["cache"].index["file"][:2])
    batch = np.stack(
        [to_model_input(decode_image(Path(f).read_bytes()).pixels, card.input) for f in files]
    )
    _, heat = runtime.run(batch)
    assert heat.shape == (2, len(NIH_LABELS), 8, 8)
    assert (heat.reshape(2, len(NIH_LABELS), -1).max(axis=-1) > 0.99).all()
    assert ModelCard.load(out / "model_card.json").onnx_sha256 == card.onnx_sha256


def test_ensemble_gain_of_a_run_with_itself_is_zero(small_cv: Path) -> None:
    from training.crossval import ensemble_gain

    gain = ensemble_gain([small_cv, small_cv], n_boot=100)
    assert gain["paired_vs_first"]["mean"]["difference"] == pytest.approx(0.0, abs=1e-12)


def test_pointing_game_out_of_fold(small_cv: Path, tmp_path: Path, data_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "pointing_game", REPO_ROOT / "benchmarks" / "pointing_game.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["pointing_game"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    boxes = bench.boxes_for_shared(data_dir)
    assert len(boxes) >= 9 and {b.label for b in boxes} <= set(NIH_LABELS)
    out = tmp_path / "points.json"
    assert bench.main(["--data", str(data_dir), "--cv", str(small_cv), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["summaries"][0]
    assert result["boxes"] == len(boxes)
    assert 0 <= result["hits"] <= result["boxes"]
    assert 0 < result["random_point_hit_rate"] < 1
    # a box containing the map's maximum is what a hit means
    for p in json.loads(out.read_text())["points"]["cv"]:
        box = next(b for b in boxes if b.file == p["file"] and b.label == p["label"])
        inside = box.x <= p["peak_x"] <= box.x + box.w and box.y <= p["peak_y"] <= box.y + box.h
        assert inside == p["hit"]


def test_saved_fold_models_reproduce_the_out_of_fold_logits(small_cv: Path) -> None:
    """Each saved fold model, scoring its own held-out fold again, gives the stored out-of-fold
    logits: the bookkeeping that the card's figures and the flip-TTA check rest on."""
    from training.crossval import flip_tta_gain

    gain = flip_tta_gain(small_cv, n_boot=50)
    assert gain["max_abs_diff_vs_stored_oof"] < 1e-4
    assert -1 < gain["mean"]["difference"] < 1
