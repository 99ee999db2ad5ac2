"""Compare zoo models on one patient-wise split with one training budget, through the project's CLI.

Each model is trained with ``cxr-triage train --config configs/demo.yaml --arch NAME`` (the same
cache, split, seed, epochs, optimiser, loss and augmentation; only the architecture and its own
zoo defaults for dropout and weight decay differ), then exported with ``cxr-triage export`` (ONNX
with parity check; validation and test metrics with bootstrap 95% CIs, thresholds fitted on
validation). For each model this prints and writes one table row:

- validation and test mean AUROC over the 14 pathologies with their 95% CIs (from the card);
- validation mean AUROC on the images that exist only at 64 px vs on the larger originals, a
  check for a source shortcut (an image's sharpness telling which subset, and so which label
  mix, it came from) that a pooled AUROC would reward;
- parameters, ONNX size, ONNX Runtime CPU latency at batch 1 (one intra-op thread: median and
  minimum of ``--latency-runs`` runs; the minimum is the uncontended estimate on a shared machine);
- training wall time (and the sum of epoch times, which excludes start-up).

``NAME@SIZE`` trains at another input size with its own cache (``cnn@128``: the shortcut demo).

    .venv/bin/python benchmarks/compare_zoo.py                      # ~40 min on 2 shared cores
    .venv/bin/python benchmarks/compare_zoo.py --archs cnn vit-v1 --epochs 5 --runs /tmp/zoo
    .venv/bin/python benchmarks/compare_zoo.py --report-only        # table from finished runs
    .venv/bin/python benchmarks/compare_zoo.py --cv runs/cv/cnn-s8 runs/cv/vit-p8 \
        --pair runs/cv/cnn-s8 runs/cv/cnn-s8-seed1 --model-dir models/default   # k-fold CV table

Runs land in ``runs/zoo/NAME`` (git-ignored); the table in ``runs/zoo/comparison.md`` and
``comparison.json``. A finished run (its ``model/model_card.json`` exists) is not redone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.card import ModelCard  # noqa: E402
from app.labels import NIH_LABELS  # noqa: E402
from training.metrics import mean_auroc  # noqa: E402

DEFAULT_ARCHS = ["cnn", "resnet34", "vit-v1", "vit-v2", "vit_tiny_patch16_224"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args]


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root, appending its output to ``log``; returns wall s."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def spec_of(name: str, base: dict[str, Any]) -> tuple[str, int, str]:
    """``"cnn@128"`` -> ("cnn", 128, a 128 px cache beside the config's); else the config's."""
    arch, _, size = name.partition("@")
    image_size = int(size) if size else int(base["image_size"])
    cache = str(base.get("cache") or "runs/cache")
    if image_size != int(base["image_size"]):
        cache = str(Path(cache).parent / f"cache-{base.get('interpolation')}-{image_size}")
    return arch, image_size, cache


def train_and_export(
    name: str, base_config: Path, runs: Path, *, epochs: int | None, threads: int | None
) -> dict[str, Any]:
    base = yaml.safe_load(base_config.read_text())
    arch, image_size, cache = spec_of(name, base)
    run = runs / name.replace("@", "-")
    log = runs / f"{run.name}.log"
    model_dir = run / "model"
    timing_path = run / "timing.json"
    if (model_dir / "model_card.json").is_file() and timing_path.is_file():
        print(f"{name}: already done ({run})", flush=True)
        return json.loads(timing_path.read_text())
    flags = ["--arch", arch, "--image-size", str(image_size), "--cache", cache]
    flags += ["--out", str(run), "--no-progress"]
    if epochs is not None:
        flags += ["--epochs", str(epochs)]
    if threads is not None:
        flags += ["--threads", str(threads)]
    resume = (run / "last.pt").is_file()
    print(f"{name}: training{' (resumed)' if resume else ''} -> {run}", flush=True)
    train_s = run_logged(
        cli("train", "--config", str(base_config), *flags, *(["--resume"] if resume else [])), log
    )
    print(f"{name}: exporting", flush=True)
    export_s = run_logged(
        cli("export", "--run", str(run), "--out", str(model_dir), "--name", run.name,
            "--no-progress"),
        log,
    )  # fmt: skip
    timing = {"train_wall_s": train_s, "export_wall_s": export_s, "resumed": resume}
    timing_path.write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def onnx_latency_ms(model_dir: Path, runs: int) -> tuple[float, float, tuple[int, ...]]:
    """Median and minimum batch-1 latency of model.onnx on the CPU provider, one thread.

    Also returns the heatmap grid shape the graph produces (ViT graphs leave it symbolic).
    """
    import onnxruntime as ort

    card = ModelCard.load(model_dir / "model_card.json")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal(
        (1, 3, card.input.height, card.input.width), dtype=np.float32
    )
    for _ in range(10):
        _, heatmap = session.run(["logits", "heatmap"], {"pixel_values": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"pixel_values": x})
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.min(times)), tuple(heatmap.shape[1:])


def by_source(run: Path, split: str = "val") -> dict[str, float | None]:
    """Mean AUROC of ``split`` on 64 px-only source images vs the larger originals."""
    preds = np.load(run / "eval" / f"preds_{split}.npz")
    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    files = splits.loc[splits["split"] == split, "file"].to_numpy()
    small = np.array([f"{os.sep}nih-64{os.sep}" in f for f in files])
    out: dict[str, float | None] = {}
    for key, mask in (("src64", small), ("src_large", ~small)):
        out[key] = mean_auroc(preds["targets"][mask], preds["probs"][mask], list(NIH_LABELS))
        out[f"{key}_images"] = int(mask.sum())
    return out


def row_for(name: str, runs: Path, latency_runs: int) -> dict[str, Any]:
    run = runs / name.replace("@", "-")
    card = ModelCard.load(run / "model" / "model_card.json")
    summary = json.loads((run / "run.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    with (run / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    median_ms, min_ms, grid = onnx_latency_ms(run / "model", latency_runs)
    val, test = card.metrics["validation"], card.metrics.get("test")
    return {
        "model": name,
        "architecture": card.architecture,
        "input": f"{card.input.height} px",
        "parameters": summary["parameters"],
        "onnx_mb": (run / "model" / "model.onnx").stat().st_size / 1e6,
        "heatmap": f"{card.heatmap_method} {'x'.join(map(str, grid))}",
        "val_mean_auroc": val.mean_auroc,
        "val_ci": (val.mean_auroc_ci_low, val.mean_auroc_ci_high),
        "test_mean_auroc": test.mean_auroc if test else None,
        "test_ci": (test.mean_auroc_ci_low, test.mean_auroc_ci_high) if test else None,
        "best_epoch": summary["best_epoch"],
        "epochs": summary["epochs_completed"],
        "latency_ms_median": median_ms,
        "latency_ms_min": min_ms,
        "train_wall_s": timing["train_wall_s"],
        "train_epochs_s": sum(float(e["epoch_s"]) for e in epochs),
        "resumed": timing.get("resumed", False),
        **by_source(run),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def auc(v: float | None, ci: tuple[float | None, float | None] | None) -> str:
        if v is None:
            return "-"
        return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci and ci[0] is not None else f"{v:.3f}"

    def opt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = (
        "| model | input | params | ONNX MB | heatmap | val mean AUROC (95% CI) | "
        "test mean AUROC (95% CI) | val AUROC 64 px src / larger src | best epoch | "
        "ONNX CPU ms, batch 1 (median / min) | train wall (epochs sum) |\n"
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|\n"
    )
    lines = [
        f"| `{r['model']}` | {r['input']} | {r['parameters'] / 1e6:.2f} M | {r['onnx_mb']:.1f} | "
        f"{r['heatmap']} | {auc(r['val_mean_auroc'], r['val_ci'])} | "
        f"{auc(r['test_mean_auroc'], r['test_ci'])} | "
        f"{opt(r['src64'])} / {opt(r['src_large'])} | {r['best_epoch']}/{r['epochs']} | "
        f"{r['latency_ms_median']:.2f} / {r['latency_ms_min']:.2f} | "
        f"{r['train_wall_s'] / 60:.1f} min ({r['train_epochs_s'] / 60:.1f})"
        f"{' resumed' if r['resumed'] else ''} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def cv_table(cv_dirs: list[Path], pairs: list[tuple[Path, Path]], n_boot: int) -> str:
    """Out-of-fold comparison of finished ``cxr-triage crossval`` folders, and averaged pairs.

    Every figure is out of fold (each image scored by models that never saw its patient); a pair
    of runs on the same folds averages its out-of-fold logits, an honest out-of-fold ensemble.
    """
    from training.crossval import ensemble_gain

    def ci(lo: float | None, hi: float | None) -> str:
        return "-" if lo is None else f"{lo:.3f}-{hi:.3f}"

    def opt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| CV run | arch | params | epochs | seed | out-of-fold mean AUROC (95% CI, patient "
        "bootstrap) | 64 px src / larger src | per-fold mean AUROC | train s per fold |",
        "|---|---|---:|---:|---:|---|---|---|---:|",
    ]
    for d in cv_dirs:
        s = json.loads((d / "summary.json").read_text())
        folds = " / ".join(f"{v['mean_auroc']:.3f}" for v in s["per_fold"].values())
        secs = [v for v in s["train_seconds"].values() if v]
        lines.append(
            f"| `{d.name}` | `{s['arch']}` | {s['parameters'] / 1e6:.2f} M | {s['epochs']} | "
            f"{s['seed']} | {s['oof_mean_auroc']:.3f} ({ci(*s['oof_mean_auroc_ci'])}) | "
            f"{opt(s['by_source']['64px']['mean_auroc'])} / "
            f"{opt(s['by_source']['larger']['mean_auroc'])} | {folds} | "
            f"{np.mean(secs):.0f} |"
        )
    if pairs:
        lines += [
            "",
            "| averaged out-of-fold logits | single (first) | averaged (95% CI) | "
            "gain (95% CI, paired patient bootstrap) | p |",
            "|---|---|---|---|---:|",
        ]
        for a, b in pairs:
            g = ensemble_gain([a, b], n_boot=n_boot)
            m = g["paired_vs_first"]["mean"]
            lines.append(
                f"| `{a.name}` + `{b.name}` | {g['single'][0]['mean_auroc']:.3f} | "
                f"{g['ensemble']['mean_auroc']:.3f} ({ci(*g['ensemble']['ci'])}) | "
                f"{m['difference']:+.3f} ({m['ci_low']:+.3f} to {m['ci_high']:+.3f}) | "
                f"{m['p_value']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cv",
        nargs="+",
        type=Path,
        help="instead of training: tabulate these finished crossval folders (out of fold)",
    )
    p.add_argument(
        "--pair",
        nargs=2,
        type=Path,
        action="append",
        default=[],
        metavar=("CV_A", "CV_B"),
        help="with --cv: also score the average of two runs' out-of-fold logits (repeatable)",
    )
    p.add_argument("--model-dir", type=Path, help="with --cv: also time this model folder")
    p.add_argument(
        "--tta", action="store_true", help="with --cv: out-of-fold gain of a left-right flip TTA"
    )
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS, help="zoo/timm names, NAME@SIZE")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "zoo")
    p.add_argument("--epochs", type=int, help="override the config's epochs (smoke runs)")
    p.add_argument("--threads", type=int, help="override the config's torch CPU threads")
    p.add_argument("--latency-runs", type=int, default=300)
    p.add_argument("--report-only", action="store_true", help="only tabulate finished runs")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cv:
        print(cv_table(args.cv, [tuple(x) for x in args.pair], args.bootstrap))
        if args.tta:
            from training.crossval import flip_tta_gain

            for d in args.cv:
                g = flip_tta_gain(d, n_boot=args.bootstrap)
                m = g["mean"]
                print(
                    f"{d}: flip TTA out of fold {m['a']:.4f} vs plain {m['b']:.4f}: "
                    f"{m['difference']:+.4f} (95% CI {m['ci_low']:+.4f} to {m['ci_high']:+.4f}, "
                    f"p {m['p_value']:.3f}); recomputed vs stored OOF logits max |d| "
                    f"{g['max_abs_diff_vs_stored_oof']:.1e}"
                )
        if args.model_dir:
            med, low, grid = onnx_latency_ms(args.model_dir, args.latency_runs)
            size = (args.model_dir / "model.onnx").stat().st_size / 1e6
            print(
                f"{args.model_dir}: model.onnx {size:.1f} MB, heatmap {list(grid)}, ONNX Runtime "
                f"CPU batch 1, one thread: median {med:.2f} ms, min {low:.2f} ms "
                f"({args.latency_runs} runs)"
            )
        return 0
    args.runs.mkdir(parents=True, exist_ok=True)
    config = args.config.resolve()
    if not args.report_only:
        for name in args.archs:
            train_and_export(name, config, args.runs, epochs=args.epochs, threads=args.threads)
    rows = [row_for(name, args.runs, args.latency_runs) for name in args.archs]
    table = markdown(rows)
    (args.runs / "comparison.md").write_text(table)
    (args.runs / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"wrote {args.runs / 'comparison.md'} and comparison.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
