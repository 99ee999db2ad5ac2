"""Pointing game on NIH's radiologist boxes: is a finding's heatmap maximum inside its box?

NIH ships ``BBox_List_2017.csv`` (984 boxes drawn by radiologists on 880 images, in the 1024 px
images' coordinates). For every shared image that has boxes, the map of the boxed finding is
upsampled to 1024x1024 exactly as the overlay draws it (bicubic, ``app.imaging.heatmap``) and its
maximum point is tested against the box (Zhang et al., 2016, without their 15 px tolerance).

Which model: ``--cv`` scores each image with the fold model that never saw its patient (the
honest figure for a model trained on every shared image); ``--model`` scores a model folder
through ONNX Runtime and the service's own decoding, which for ``models/default`` means images it
was trained on (printed, labelled in-sample). Baselines on the same boxes: a uniformly random
point (its hit rate is the box's share of the image) and the image centre.

    .venv/bin/python benchmarks/pointing_game.py --cv runs/cv/cnn-s8 --model models/default \
        --write-card models/default/model_card.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# NIH's box list spells one finding differently from the label list.
BOX_LABELS = {"Infiltrate": "Infiltration"}
SIDE = 1024


@dataclass
class Box:
    file: str
    label: str
    x: float
    y: float
    w: float
    h: float


@dataclass
class Point:
    file: str
    label: str
    hit: bool
    peak_x: float
    peak_y: float
    box_fraction: float
    centre_hit: bool


def boxes_for_shared(data_dir: Path) -> list[Box]:
    """The boxes of shared images, label names as in the model's label list."""
    labels = pd.read_csv(data_dir / "nih" / "labels.csv", dtype=str, keep_default_na=False)
    raw = pd.read_csv(data_dir / "nih" / "metadata" / "BBox_List_2017.csv")
    raw = raw.rename(columns={"Bbox [x": "x", "h]": "h"})
    merged = labels.merge(raw, left_on="image_index", right_on="Image Index")
    return [
        Box(
            file=str(data_dir / "nih" / r.file),
            label=BOX_LABELS.get(r["Finding Label"], r["Finding Label"]),
            x=float(r.x),
            y=float(r.y),
            w=float(r.w),
            h=float(r.h),
        )
        for _, r in merged.iterrows()
    ]


def peak(grid: np.ndarray) -> tuple[float, float]:
    """(x, y) of the map's maximum in 1024 px coordinates, on the map as the overlay draws it."""
    heat = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F")
    up = np.asarray(heat.resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    return float(x) + 0.5, float(y) + 0.5


def score(box: Box, grid: np.ndarray) -> Point:
    px, py = peak(grid)
    inside = box.x <= px <= box.x + box.w and box.y <= py <= box.y + box.h
    c = SIDE / 2
    centre = box.x <= c <= box.x + box.w and box.y <= c <= box.y + box.h
    return Point(box.file, box.label, inside, px, py, box.w * box.h / SIDE**2, centre)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(mid - half), float(mid + half)


def cv_maps(cv_dir: Path, boxes: list[Box]) -> list[np.ndarray]:
    """Each box's map from the fold model that held out the image's patient (torch)."""
    import torch

    from training.augment import Normalizer
    from training.crossval import load_oof
    from training.dataset import CachedImages
    from training.export import load_cv_members

    oof = load_oof(cv_dir)
    cache = oof["cache"]
    members, spec, labels = load_cv_members([cv_dir])
    fold_of = dict(
        zip(
            (os.path.basename(f) for f in cache.index["file"]),
            zip(oof["folds"], range(len(oof["folds"])), strict=True),
            strict=True,
        )
    )
    normalizer = Normalizer(spec["mean"], spec["std"], torch.device("cpu"))
    maps = []
    for box in boxes:
        fold, row = fold_of[os.path.basename(box.file)]
        images, _ = CachedImages(cache, [row]).__getitems__([0])
        with torch.inference_mode():
            _, heat = members[int(fold)](normalizer(images))
        maps.append(heat[0, labels.index(box.label)].numpy())
    return maps


def model_maps(model_dir: Path, boxes: list[Box]) -> list[np.ndarray]:
    """Each box's map from a model folder, through the service's decoding and ONNX Runtime."""
    from app.imaging.decode import decode_image
    from app.imaging.heatmap import select_map
    from app.imaging.preprocess import to_model_input
    from app.inference.runtime import ModelRuntime

    runtime = ModelRuntime.load(model_dir, providers="cpu", intra_op_threads=1)
    card = runtime.card
    maps = []
    for box in boxes:
        decoded = decode_image(Path(box.file).read_bytes())
        _, heat = runtime.run(to_model_input(decoded.pixels, card.input)[None])
        maps.append(select_map(heat[0], card.labels.index(box.label)))
    return maps


def summary(points: list[Point], what: str) -> dict:
    n = len(points)
    hits = sum(p.hit for p in points)
    lo, hi = wilson(hits, n)
    per_label: dict[str, dict[str, int]] = {}
    for p in points:
        e = per_label.setdefault(p.label, {"boxes": 0, "hits": 0})
        e["boxes"] += 1
        e["hits"] += int(p.hit)
    return {
        "model": what,
        "boxes": n,
        "images": len({p.file for p in points}),
        "hits": hits,
        "hit_rate": hits / n if n else None,
        "hit_rate_ci95": [lo, hi],
        "random_point_hit_rate": float(np.mean([p.box_fraction for p in points])) if n else None,
        "centre_point_hit_rate": float(np.mean([p.centre_hit for p in points])) if n else None,
        "per_label": per_label,
    }


def report(s: dict) -> str:
    lo, hi = s["hit_rate_ci95"]
    lines = [
        f"{s['model']}: pointing game {s['hits']}/{s['boxes']} boxes hit "
        f"({s['hit_rate']:.2f}, 95% Wilson CI {lo:.2f}-{hi:.2f}) on {s['images']} images; "
        f"random point {s['random_point_hit_rate']:.2f}, image centre "
        f"{s['centre_point_hit_rate']:.2f}",
    ]
    for label, e in sorted(s["per_label"].items()):
        lines.append(f"  {label:<14} {e['hits']}/{e['boxes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("CXR_DATA_DIR", "../shared/data"))
    parser.add_argument("--cv", type=Path, help="crossval folder: out-of-fold maps (torch)")
    parser.add_argument("--model", type=Path, help="model folder: maps through ONNX Runtime")
    parser.add_argument(
        "--write-card",
        type=Path,
        help="store the --cv result (else --model's) as `localisation` in this model card",
    )
    parser.add_argument("--json", type=Path, help="also write every point to this JSON file")
    args = parser.parse_args(argv)
    if not (args.cv or args.model):
        parser.error("give --cv and/or --model")
    boxes = boxes_for_shared(Path(args.data))
    if not boxes:
        print("no shared image has an NIH box")
        return 1
    results = []
    points_out: dict[str, list[dict]] = {}
    if args.cv:
        pts = [score(b, m) for b, m in zip(boxes, cv_maps(args.cv, boxes), strict=True)]
        results.append(summary(pts, f"out-of-fold fold models of {args.cv}"))
        points_out["cv"] = [asdict(p) for p in pts]
    if args.model:
        pts = [score(b, m) for b, m in zip(boxes, model_maps(args.model, boxes), strict=True)]
        results.append(summary(pts, f"{args.model} (in-sample: it was trained on these images)"))
        points_out["model"] = [asdict(p) for p in pts]
    for s in results:
        print(report(s))
    if args.json:
        args.json.write_text(json.dumps({"summaries": results, "points": points_out}, indent=2))
    if args.write_card:
        from app.card import Localisation, ModelCard

        card = ModelCard.load(args.write_card)
        card.localisation = Localisation.model_validate(
            {
                **results[0],
                "benchmark": "pointing game on NIH BBox_List_2017.csv boxes of the shared images "
                "(map maximum, upsampled to 1024 px as drawn, inside the box; no tolerance)",
                "command": "python benchmarks/pointing_game.py " + " ".join(argv or sys.argv[1:]),
            }
        )
        card.save(args.write_card)
        print(f"wrote localisation into {args.write_card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
