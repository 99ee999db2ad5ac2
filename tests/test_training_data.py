"""Training data: NIH labels, patient-disjoint splits, the uint8 cache, sampling, augmentation.

Real files only: the full Data_Entry_2017_v2020.csv with NIH's official lists, the shared
labels.csv and its PNGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.labels import NIH_LABELS, PATHOLOGIES
from training.data import (
    LeakageError,
    assign_splits,
    check_patient_disjoint,
    read_labels,
    split_summary,
)


@pytest.fixture(scope="module")
def data_entry(nih_dir: Path) -> pd.DataFrame:
    return read_labels(nih_dir / "metadata" / "Data_Entry_2017_v2020.csv", image_root=nih_dir)


@pytest.fixture(scope="module")
def shared_labels(nih_dir: Path) -> pd.DataFrame:
    return read_labels(nih_dir / "labels.csv")


def _patients_per_split(table: pd.DataFrame, split: np.ndarray) -> dict[str, set[str]]:
    return {s: set(table.loc[split == s, "patient_id"]) for s in ("train", "val", "test")}


def test_data_entry_multi_hot_in_design_order(data_entry: pd.DataFrame) -> None:
    assert len(data_entry) == 112_120
    assert list(data_entry.columns[3:]) == list(NIH_LABELS)
    row = data_entry.set_index(data_entry["file"].map(lambda f: Path(f).name))
    assert row.loc["00000001_001.png", list(NIH_LABELS)].to_dict() == {
        name: int(name in ("Cardiomegaly", "Emphysema")) for name in NIH_LABELS
    }
    # every image is either "No Finding" or has at least one pathology, never both
    y = data_entry[list(NIH_LABELS)].to_numpy()
    assert ((y[:, :14].sum(1) > 0) ^ (y[:, 14] == 1)).all()
    assert int(data_entry["Hernia"].sum()) == 227  # NIH's published count


def test_official_split_on_data_entry_is_patient_disjoint(
    data_entry: pd.DataFrame, nih_dir: Path
) -> None:
    split = assign_splits(data_entry, mode="official", val_fraction=0.1, seed=0)
    patients = _patients_per_split(data_entry, split)
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    test_names = set((nih_dir / "metadata" / "test_list.txt").read_text().split())
    names = data_entry["file"].map(lambda f: Path(f).name)
    assert set(names[split == "test"]) == test_names
    n_trainval = len(patients["train"]) + len(patients["val"])
    assert len(patients["val"]) / n_trainval == pytest.approx(0.1, abs=0.01)
    again = assign_splits(data_entry, mode="official", val_fraction=0.1, seed=0)
    other = assign_splits(data_entry, mode="official", val_fraction=0.1, seed=1)
    assert (again == split).all()
    assert (other != split).any()


@pytest.mark.parametrize("mode", ["official", "patient"])
def test_shared_labels_splits_are_patient_disjoint(shared_labels: pd.DataFrame, mode: str) -> None:
    split = assign_splits(shared_labels, mode=mode, val_fraction=0.15, test_fraction=0.2, seed=3)
    patients = _patients_per_split(shared_labels, split)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not patients[a] & patients[b], (a, b)
    counts = split_summary(shared_labels, split)
    assert sum(c["images"] for c in counts.values()) == len(shared_labels) == 1197
    assert all(c["images"] > 0 for c in counts.values())


def test_shared_labels_match_one_hot_columns_and_files_exist(
    shared_labels: pd.DataFrame, nih_dir: Path
) -> None:
    raw = pd.read_csv(nih_dir / "labels.csv")
    one_hot = raw[[name.replace(" ", "_") for name in NIH_LABELS]].to_numpy()
    assert (shared_labels[list(NIH_LABELS)].to_numpy() == one_hot).all()
    assert all(Path(f).is_file() for f in shared_labels["file"])
    assert (shared_labels["patient_id"] == raw["patient_id"].astype(str)).all()


def test_mixed_patient_in_official_lists_is_refused() -> None:
    table = pd.DataFrame(
        {
            "file": ["a.png", "b.png", "c.png"],
            "patient_id": ["1", "1", "2"],
            "official_split": ["train_val", "test", "train_val"],
        }
    )
    with pytest.raises(LeakageError, match="1 patients"):
        assign_splits(table, mode="official")
    with pytest.raises(LeakageError):
        check_patient_disjoint(np.array(["7", "7"]), np.array(["train", "val"]))


def test_csv_without_patient_column_uses_nih_names(tmp_path: Path, nih_dir: Path) -> None:
    raw = pd.read_csv(nih_dir / "labels.csv").head(40)
    raw["file"] = str(nih_dir) + "/" + raw["file"]
    raw[["file", "finding_labels", "official_split"]].to_csv(tmp_path / "l.csv", index=False)
    table = read_labels(tmp_path / "l.csv")
    assert (table["patient_id"] == raw["patient_id"].astype(str)).all()


def test_cache_matches_the_serving_resize(tmp_path: Path, shared_labels: pd.DataFrame) -> None:
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import resize_gray
    from training.cache import build_cache, open_cache

    rows = pd.concat(
        [
            shared_labels[shared_labels["file"].str.contains(s)].head(2)
            for s in ("nih-1024", "nih-256", "nih-64", "misc")
        ]
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    table = pd.concat([rows, rows.head(1).assign(file=str(broken))], ignore_index=True)
    cache = build_cache(
        table, tmp_path / "c", size=48, interpolation="bicubic", workers=2, progress=False
    )
    assert len(cache.index) == len(rows)
    assert str(broken) in (open_cache(tmp_path / "c").path / "cache.json").read_text()
    for i, path in enumerate(rows["file"]):
        want = resize_gray(decode_image(Path(path).read_bytes()).pixels, 48, 48, "bicubic")
        got = cache.images[cache.index["row"].iloc[i]] / 255.0
        assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6
    assert (cache.targets == rows[list(NIH_LABELS)].to_numpy()).all()


def test_normalizer_matches_serving_preprocessing(nih_dir: Path) -> None:
    import torch

    from app.card import InputSpec
    from app.imaging.decode import decode_image
    from app.imaging.preprocess import resize_gray, to_model_input
    from training.augment import Normalizer

    spec = InputSpec(height=64, width=64, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    pixels = decode_image((nih_dir / "images/nih-1024/00000075_000.png").read_bytes()).pixels
    cached = np.rint(resize_gray(pixels, 64, 64, spec.interpolation) * 255).astype(np.uint8)
    ours = Normalizer(spec.mean, spec.std, torch.device("cpu"))(
        torch.from_numpy(cached)[None, None]
    )
    serving = to_model_input(pixels, spec)
    # only the uint8 rounding of the cache differs: half a grey level over the smallest std
    assert np.abs(ours[0].numpy() - serving).max() <= 0.5 / 255 / 0.2 + 1e-5


def test_augmentation_is_chest_safe() -> None:
    import torch

    from training.augment import AugmentConfig, augment

    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 4:12, 2:8] = 1.0  # a bright block at the top left
    out = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    top, bottom = out[:, :, :16].sum((1, 2, 3)), out[:, :, 16:].sum((1, 2, 3))
    left, right = out[..., :16].sum((1, 2, 3)), out[..., 16:].sum((1, 2, 3))
    assert (top > bottom).all() and (left > right).all()  # never flipped either way by default
    assert not torch.equal(out[0], out[1])  # but each image gets its own transform
    still = AugmentConfig(rotate=0, translate=0, scale=0, hflip=0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, still, torch.Generator().manual_seed(0)), x, atol=1e-5)
    flipped = augment(
        x,
        AugmentConfig(rotate=0, translate=0, scale=0, hflip=1.0, brightness=0, contrast=0),
        torch.Generator().manual_seed(0),
    )
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)


def test_imbalance_weights_favour_rare_labels(shared_labels: pd.DataFrame) -> None:
    from training.dataset import EpochSampler, label_weights, sample_weights

    y = shared_labels[list(NIH_LABELS)].to_numpy(dtype=np.float32)
    counts = y.sum(0)
    for mode in ("label_count", "effective"):
        w = label_weights(y, mode)
        assert w[np.argmin(counts)] == w.max() and w[np.argmax(counts)] == w.min()
        per_image = sample_weights(y, mode)
        hernia = y[:, PATHOLOGIES.index("Hernia")] == 1
        assert per_image[hernia].min() >= per_image[~hernia].max()  # Hernia is the rarest
    # effective numbers saturate: less extreme than inverse frequency
    lc, ef = label_weights(y, "label_count"), label_weights(y, "effective", beta=0.99)
    assert ef.max() / ef.min() < lc.max() / lc.min()
    drawn = list(EpochSampler(len(y), weights=sample_weights(y, "label_count"), seed=0))
    plain = list(EpochSampler(len(y), seed=0))
    rare = np.flatnonzero(y[:, PATHOLOGIES.index("Hernia")] == 1)
    assert np.isin(drawn, rare).mean() > 3 * np.isin(plain, rare).mean()
    assert sorted(plain) == list(range(len(y)))
    halves = [list(EpochSampler(len(y), seed=0, rank=r, world=2)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == (len(y) + 1) // 2
    assert set(halves[0]) | set(halves[1]) == set(range(len(y)))
