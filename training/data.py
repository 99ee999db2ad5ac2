"""Label tables and patient-disjoint splits for NIH ChestX-ray14.

A label table is a pandas DataFrame with one row per image and the columns ``file`` (absolute
path), ``patient_id`` (str), ``official_split`` ("train_val", "test" or "") and one 0/1 column per
label in ``app.labels.NIH_LABELS`` order. Two inputs make one: the NIH ``Data_Entry_2017_v2020.csv``
(with the official ``train_val_list.txt`` / ``test_list.txt``) and any CSV with a file column, such
as the shared ``nih/labels.csv``. Everything is vectorised: 112k rows parse in about a second.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from app.labels import NIH_LABELS

log = logging.getLogger(__name__)

FILE_COLUMNS = ("file", "path", "filename", "Image Index", "image_index")
FINDING_COLUMNS = ("Finding Labels", "finding_labels")
PATIENT_COLUMNS = ("patient_id", "Patient ID", "patient")
SPLITS = ("train", "val", "test")
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")


class LeakageError(ValueError):
    """A patient appears in two splits."""


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip()).lower()


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def multi_hot(findings: pd.Series, labels: Sequence[str] = NIH_LABELS) -> np.ndarray:
    """``"Cardiomegaly|Effusion"`` strings -> uint8 [N, L] in ``labels`` order (vectorised)."""
    dummies = findings.fillna("").astype(str).str.get_dummies(sep="|")
    dummies.columns = [_norm(c) for c in dummies.columns]
    known = {_norm(lbl) for lbl in labels}
    unknown = sorted(set(dummies.columns) - known - {""})
    if unknown:
        log.warning("ignoring unknown finding labels: %s", ", ".join(unknown))
    out = dummies.reindex(columns=[_norm(lbl) for lbl in labels], fill_value=0)
    return out.to_numpy(dtype=np.uint8)


def read_official_lists(folder: str | Path) -> dict[str, str]:
    """Image name -> "train_val" / "test" from NIH's official list files."""
    folder = Path(folder)
    split: dict[str, str] = {}
    for name, value in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        path = folder / name
        if path.is_file():
            split.update(dict.fromkeys(path.read_text().split(), value))
    return split


def read_labels(
    csv_path: str | Path,
    *,
    image_root: str | Path | None = None,
    official_lists: str | Path | None = None,
    labels: Sequence[str] = NIH_LABELS,
) -> pd.DataFrame:
    """Read a labels CSV into a label table (see the module docstring).

    Image paths are relative to ``image_root`` (default: the CSV's folder). Names that do not exist
    there are looked up by file name anywhere under it, which covers NIH's ``images_001/images``
    archive layout.
    """
    csv_path = Path(csv_path)
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    file_col = _first(raw.columns, FILE_COLUMNS)
    if file_col is None:
        raise ValueError(f"{csv_path}: no file column (one of {', '.join(FILE_COLUMNS)})")
    root = Path(image_root) if image_root else csv_path.parent

    finding_col = _first(raw.columns, FINDING_COLUMNS)
    if finding_col is not None:
        y = multi_hot(raw[finding_col], labels)
    else:
        by_norm = {_norm(c): c for c in raw.columns}
        missing = [lbl for lbl in labels if _norm(lbl) not in by_norm]
        if missing:
            raise ValueError(f"{csv_path}: no finding column and no one-hot columns for {missing}")
        cols = [by_norm[_norm(lbl)] for lbl in labels]
        y = raw[cols].apply(pd.to_numeric).to_numpy().astype(np.uint8)

    names = raw[file_col].astype(str)
    patient_col = _first(raw.columns, PATIENT_COLUMNS)
    if patient_col is not None:
        patients = raw[patient_col].astype(str).str.lstrip("0").replace("", "0")
    else:
        base = names.map(os.path.basename).str.extract(_NIH_NAME, expand=False)
        if base.isna().any():
            log.warning(
                "%s: no patient column; images without an NIH name are own patients", csv_path
            )
        patients = base.str.lstrip("0").fillna("file:" + names)

    if "official_split" in raw.columns:
        official = raw["official_split"].astype(str)
    else:
        lists = read_official_lists(official_lists or csv_path.parent)
        official = names.map(os.path.basename).map(lists).fillna("")
        if not lists:
            log.warning("no official train_val/test lists found; every image is train_val")
            official = pd.Series("train_val", index=raw.index)

    table = pd.DataFrame(
        {
            "file": _resolve_files(names, root),
            "patient_id": patients.to_numpy(),
            "official_split": official.to_numpy(),
        }
    )
    table[list(labels)] = y
    return table


def _resolve_files(names: pd.Series, root: Path) -> list[str]:
    """Join names onto ``root``; find the ones that are not there by file name under it."""
    paths = [str(root / n) if not os.path.isabs(n) else n for n in names]
    exists = np.fromiter((os.path.exists(p) for p in paths), dtype=bool, count=len(paths))
    if exists.all() or not root.is_dir():
        return paths
    found: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            found.setdefault(f, os.path.join(dirpath, f))
    resolved = [
        p if ok else found.get(os.path.basename(p), p) for p, ok in zip(paths, exists, strict=True)
    ]
    still = sum(not os.path.exists(p) for p in resolved)
    if still:
        log.warning("%d of %d images not found under %s", still, len(paths), root)
    return resolved


def assign_splits(
    table: pd.DataFrame,
    *,
    mode: str = "official",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """A "train"/"val"/"test" string per row; patients never span two splits.

    ``official``: test is NIH's official test list; validation is a seeded carve-out of whole
    patients from train_val. ``patient``: test and validation are both seeded patient carve-outs
    (for data without an official split). Raises LeakageError if the input itself mixes a patient
    across the official lists.
    """
    groups = table["patient_id"].to_numpy()
    split = np.full(len(table), "train", dtype=object)
    if mode == "official":
        split[table["official_split"].to_numpy() == "test"] = "test"
        check_patient_disjoint(groups, split, what="the official train_val/test lists")
    elif mode == "patient":
        _carve(split, groups, np.flatnonzero(split == "train"), test_fraction, "test", seed)
    else:
        raise ValueError(f"unknown split mode {mode!r}")
    _carve(split, groups, np.flatnonzero(split == "train"), val_fraction, "val", seed + 1)
    check_patient_disjoint(groups, split)
    return split.astype(str)


def _carve(
    split: np.ndarray, groups: np.ndarray, rows: np.ndarray, fraction: float, name: str, seed: int
) -> None:
    if len(np.unique(groups[rows])) < 2:
        return
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, held = next(gss.split(rows, groups=groups[rows]))
    split[rows[held]] = name


def check_patient_disjoint(groups: np.ndarray, split: np.ndarray, *, what: str = "splits") -> None:
    """Raise LeakageError naming the patients that appear in more than one split."""
    frame = pd.DataFrame({"g": groups, "s": split})
    n_splits = frame.groupby("g")["s"].nunique()
    shared = n_splits[n_splits > 1]
    if len(shared):
        raise LeakageError(
            f"{len(shared)} patients appear in more than one of {what}, e.g. "
            f"{', '.join(map(str, shared.index[:5]))}"
        )


def split_summary(table: pd.DataFrame, split: np.ndarray) -> dict[str, dict[str, int]]:
    """Image and patient counts per split, for logs and the model card."""
    out: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        rows = split == name
        out[name] = {
            "images": int(rows.sum()),
            "patients": int(table.loc[rows, "patient_id"].nunique()),
        }
    return out
