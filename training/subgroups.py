"""Subgroup AUROC by view (PA/AP), sex and age band, from the NIH metadata.

The official NIH test list is 57% AP (bedside, sicker patients) against 35% in train_val, so a
single mean AUROC mixes two populations; the figures per view, sex and age band say where a model
is weaker. Metadata comes from the labels CSV the run was trained from: NIH's
``Data_Entry_2017_v2020.csv`` (``View Position``, ``Patient Gender``, ``Patient Age``) or the
shared ``labels.csv`` (``view``, ``sex``, ``age``), joined on the image file name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.metrics import auroc_table

log = logging.getLogger(__name__)

FILE_COLUMNS = ("Image Index", "image_index", "file", "path", "filename")
ATTRIBUTES = {
    "view": ("View Position", "view", "view_position", "ViewPosition"),
    "sex": ("Patient Gender", "sex", "Patient Sex", "PatientSex"),
    "age": ("Patient Age", "age", "PatientAge"),
}
AGE_BANDS = (0, 18, 40, 60, 80, 200)
AGE_NAMES = ("0-17", "18-39", "40-59", "60-79", "80+")
MIN_IMAGES = 20


def read_metadata(csv_path: str | Path) -> pd.DataFrame:
    """Image file name -> ``view``, ``sex``, ``age_band`` (missing columns are left out)."""
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    file_col = next((c for c in FILE_COLUMNS if c in raw.columns), None)
    if file_col is None:
        raise ValueError(f"{csv_path}: no file column for the metadata join")
    out = pd.DataFrame({"name": raw[file_col].map(os.path.basename)})
    for attr, candidates in ATTRIBUTES.items():
        col = next((c for c in candidates if c in raw.columns), None)
        if col is None:
            continue
        values = raw[col].str.strip()
        if attr == "age":
            years = pd.to_numeric(values.str.rstrip("Yy"), errors="coerce")
            out["age_band"] = pd.cut(years, AGE_BANDS, right=False, labels=list(AGE_NAMES)).astype(
                str
            )
            out.loc[years.isna(), "age_band"] = ""
        else:
            out[attr] = values.str.upper()
    return out.drop_duplicates("name").set_index("name")


def metadata_for(files: Sequence[str], csv_path: str | Path | None) -> pd.DataFrame | None:
    """Metadata rows aligned with ``files`` (by base name), or None when there is none."""
    if not csv_path or not Path(csv_path).is_file():
        log.warning("no labels CSV with metadata (%s): no subgroup figures", csv_path)
        return None
    meta = read_metadata(csv_path)
    names = pd.Index([os.path.basename(f) for f in files])
    aligned = meta.reindex(names).fillna("")
    return aligned.reset_index(drop=True)


def subgroup_table(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    meta: pd.DataFrame,
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean (and per-label) AUROC with patient-bootstrap CIs for every level with enough images.

    Levels with fewer than ``min_images`` images, and empty or unknown values, are left out
    rather than reported with a meaningless interval.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for attr in ("view", "sex", "age_band"):
        if attr not in meta.columns:
            continue
        values = meta[attr].to_numpy()
        levels: dict[str, dict[str, Any]] = {}
        for level in sorted(set(values) - {"", "NAN", "nan"}):
            rows = values == level
            if rows.sum() < min_images:
                continue
            table = auroc_table(
                targets[rows], probs[rows], labels, n_boot=n_boot, seed=seed, groups=groups[rows]
            )
            levels[str(level)] = {
                "n_images": table["n_images"],
                "n_patients": table["n_patients"],
                "mean_auroc": table["mean_auroc"],
                "mean_auroc_ci_low": table["mean_auroc_ci_low"],
                "mean_auroc_ci_high": table["mean_auroc_ci_high"],
                "per_label": {k: v["auroc"] for k, v in table["per_label"].items()},
            }
        if levels:
            out[attr] = levels
    return out
