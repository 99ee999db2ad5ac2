"""``cxr-triage cache | train | crossval | evaluate | compare | export | download``: training CLI.

``app.cli`` hands these sub-commands to :func:`main` (``argv`` starts with the sub-command).
Importing this module imports neither torch nor timm, so ``cxr-triage --help`` and ``serve`` stay
light; each command imports what it needs when it runs. ``train`` reads a YAML config
(``--config``) and lets any flag override it; ``torchrun --nproc-per-node=N -m training.cli train
...`` runs the same command with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from training.config import add_config_flags, resolve_config

log = logging.getLogger("training")
COMMANDS = ("cache", "train", "crossval", "evaluate", "compare", "export", "download")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Train, evaluate and export cxr-triage models (NIH ChestX-ray14).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("cache", help="decode and resize images once into a uint8 cache")
    p.add_argument("--labels", required=True, help="Data_Entry_2017_v2020.csv or a labels CSV")
    p.add_argument("--image-root", help="folder the CSV's image paths are relative to")
    p.add_argument("--official-lists", help="folder with train_val_list.txt / test_list.txt")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--image-size", type=int, default=224, help="side in pixels (default 224)")
    p.add_argument(
        "--interpolation",
        default="bicubic",
        choices=["nearest", "bilinear", "bicubic", "lanczos"],
        help="resize filter; use the model's (timm ViTs: bicubic; zoo models: bilinear)",
    )
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (smoke tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("train", help="train a model into a run folder")
    p.add_argument("--config", help="YAML config (keys = flag names); flags override it")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue --out from its last.pt with its saved config (+ flags given)",
    )
    add_config_flags(p)

    p = sub.add_parser(
        "crossval", help="patient-wise k-fold CV: fold models and out-of-fold AUROC (patient CI)"
    )
    p.add_argument("--config", help="YAML config (keys = flag names); flags override it")
    p.add_argument("--folds", type=int, default=5, help="k (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument(
        "--only-folds", type=int, nargs="+", default=None, help="train just these folds now"
    )
    p.add_argument(
        "--ensemble-with",
        nargs="+",
        default=None,
        metavar="CV_DIR",
        help="instead of training: out-of-fold AUROC of averaging --out with these CV folders",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for CIs")
    add_config_flags(p)

    p = sub.add_parser("evaluate", help="AUROC with CIs, thresholds and ROC curves of a run")
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument(
        "--split",
        default=None,
        choices=["val", "test"],
        help="split to report (default: test if the run has one, else val)",
    )
    _eval_flags(p)
    p.add_argument(
        "--subgroup-bootstrap",
        type=int,
        default=None,
        help="bootstrap replicates per view/sex/age subgroup (default: --bootstrap)",
    )
    p.add_argument(
        "--bootstrap-unit",
        default="patient",
        choices=["patient", "image"],
        help="what the CI bootstrap resamples (default patient; image only to compare)",
    )

    p = sub.add_parser(
        "compare", help="paired patient-level bootstrap of two runs' AUROC on the same images"
    )
    p.add_argument("--run", action="append", required=True, help="run folder (give it twice: A, B)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="default test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=2000, help="paired replicates (default 2000)")
    p.add_argument("--out", help="also write the comparison as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("export", help="write the ONNX model folder (or a Triton repository)")
    p.add_argument("--run", help="run folder written by train")
    p.add_argument(
        "--cv",
        nargs="+",
        metavar="CV_DIR",
        help="instead of --run: the fold models of these crossval folders as one averaging graph",
    )
    p.add_argument("--roc", metavar="PNG", help="with --cv: also plot the out-of-fold ROC curves")
    p.add_argument("--out", help="model folder to write (model.onnx + model_card.json)")
    p.add_argument("--model", help="existing model folder (with --triton, instead of --run)")
    p.add_argument("--name", help="card name (default: the --out folder's name)")
    p.add_argument("--version", default="0.1.0", help="card version (default 0.1.0)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (default 1e-4)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="write a float16 graph (float32 inputs/outputs); reports flipped decisions on val",
    )
    p.add_argument(
        "--fp16-atol", type=float, default=1e-2, help="fp16 parity tolerance (default 1e-2)"
    )
    p.add_argument("--intended-use", help="replace the card's intended-use text")
    p.add_argument("--limitations", help="replace the card's limitations text")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write an int8 model folder (ONNX Runtime quantisation) of --out or --model, "
        "its CPU speed-up and AUROC/decision change on validation images in the card",
    )
    p.add_argument("--quantize-out", metavar="DIR", help="the int8 folder (default: <folder>-int8)")
    p.add_argument(
        "--quantize-method",
        default="auto",
        choices=["auto", "dynamic", "static"],
        help="dynamic (MatMul weights; transformers), static (calibrated QDQ; CNNs), "
        "auto: by the graph (default)",
    )
    p.add_argument(
        "--val-run",
        metavar="RUN_DIR",
        help="with --model --quantize: validation (and calibration) images from this run",
    )
    p.add_argument(
        "--quantize-seconds", type=float, default=10.0, help="CPU timing window (default 10)"
    )
    p.add_argument("--triton", metavar="REPO_DIR", help="also write a Triton model repository")
    p.add_argument("--triton-max-batch-size", type=int, default=None)
    p.add_argument("--triton-max-queue-delay-us", type=int, default=None)
    p.add_argument("--triton-instances", type=int, default=None)
    p.add_argument("--triton-kind", default=None, choices=["KIND_GPU", "KIND_CPU"])
    _eval_flags(p)

    sub.add_parser(
        "download", help="download NIH ChestX-ray14 (see `download --help`)", add_help=False
    )
    return parser


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present) | cpu | cuda (default auto)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for CIs")
    p.add_argument(
        "--screening-sensitivity",
        type=float,
        default=0.95,
        help="sensitivity target of the screening threshold (default 0.95)",
    )
    p.add_argument("--diagnosis-method", default="youden", choices=["youden", "f1"])
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="keep temperature 1.0 (default: temperature scaling fitted on validation)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _cache(args: argparse.Namespace) -> int:
    from training.cache import build_cache
    from training.data import read_labels

    table = read_labels(args.labels, image_root=args.image_root, official_lists=args.official_lists)
    if args.limit:
        table = table.iloc[: args.limit]
    cache = build_cache(
        table,
        args.out,
        size=args.image_size,
        interpolation=args.interpolation,
        workers=args.workers,
        progress=args.progress,
        source=str(args.labels),
    )
    print(f"cached {len(cache.index)} of {len(table)} images at {cache.size}px in {cache.path}")
    return 0 if len(cache.index) else 1


def _train(args: argparse.Namespace) -> int:
    import yaml

    from training.config import TrainConfig
    from training.trainer import train

    base = None
    if args.resume:
        out = getattr(args, "out", None)
        if not out:
            print("--resume needs --out RUN_DIR", file=sys.stderr)
            return 2
        base = yaml.safe_load((Path(out) / "config.yaml").read_text())
    cfg: TrainConfig = resolve_config(args, base=base)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        auc = summary.get("best_val_mean_auroc")
        print(
            f"{summary['status']}: {summary['epochs_completed']} epochs, best epoch "
            f"{summary['best_epoch']}, val mean AUROC "
            f"{'n/a' if auc is None else f'{auc:.4f}'}; run folder {cfg.out}"
        )
    return 0


def _crossval(args: argparse.Namespace) -> int:
    import json

    from training.crossval import ensemble_gain, run_crossval

    if args.ensemble_with:
        if not getattr(args, "out", None):
            print("crossval --ensemble-with needs --out CV_DIR", file=sys.stderr)
            return 2
        dirs = [Path(args.out), *map(Path, args.ensemble_with)]
        gain = ensemble_gain(dirs, n_boot=args.bootstrap)
        print(json.dumps(gain["single"] + [gain["ensemble"]], indent=2))
        mean = gain["paired_vs_first"]["mean"]
        print(
            f"ensemble - single (out of fold, paired patient bootstrap): "
            f"{mean['difference']:+.4f} (95% CI {mean.get('ci_low', float('nan')):+.4f} to "
            f"{mean.get('ci_high', float('nan')):+.4f}, p {mean.get('p_value', float('nan')):.3f})"
        )
        return 0
    cfg = resolve_config(args)
    if not cfg.out:
        print("crossval needs --out CV_DIR", file=sys.stderr)
        return 2
    summary = run_crossval(
        cfg,
        cfg.out,
        k=args.folds,
        fold_seed=args.fold_seed,
        folds_to_run=args.only_folds,
        n_boot=args.bootstrap,
    )
    if summary:
        lo, hi = summary["oof_mean_auroc_ci"]
        src = {
            k: "n/a" if v["mean_auroc"] is None else f"{v['mean_auroc']:.4f}"
            for k, v in summary["by_source"].items()
        }
        print(
            f"{summary['arch']}: out-of-fold mean AUROC {summary['oof_mean_auroc']:.4f} "
            f"(95% CI {lo:.4f}-{hi:.4f}, patient bootstrap) over {summary['images']} images / "
            f"{summary['patients']} patients; 64 px sources {src['64px']}, "
            f"larger sources {src['larger']}; {cfg.out}/summary.json"
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run, format_report, load_run

    run = load_run(args.run, device=args.device)
    split = args.split or ("test" if len(run.positions("test")) else "val")
    result = evaluate_run(
        args.run,
        split=split,
        n_boot=args.bootstrap,
        batch_size=args.batch_size,
        target_sensitivity=args.screening_sensitivity,
        diagnosis_method=args.diagnosis_method,
        progress=args.progress,
        run=run,
        calibrate=args.calibrate,
        subgroup_boot=args.subgroup_bootstrap,
        bootstrap_unit=args.bootstrap_unit,
    )
    print(format_report(result))
    print(
        f"wrote {Path(args.run) / 'eval' / f'{split}.json'}, {split}_roc.png and "
        f"{split}_reliability.png"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from training.evaluate import compare_runs, format_comparison

    if len(args.run) != 2:
        print("compare takes exactly two --run folders (A, then B)", file=sys.stderr)
        return 2
    result = compare_runs(
        args.run[0],
        args.run[1],
        split=args.split,
        device=args.device,
        batch_size=args.batch_size,
        n_boot=args.bootstrap,
        progress=args.progress,
    )
    print(format_comparison(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    model_dir: Path | None = None
    if args.cv:
        if not args.out:
            print("export --cv needs --out MODEL_DIR", file=sys.stderr)
            return 2
        from training.export import ParityError, export_cv

        try:
            card = export_cv(
                args.cv,
                args.out,
                name=args.name,
                version=args.version,
                opset=args.opset,
                atol=args.atol,
                n_boot=args.bootstrap,
                target_sensitivity=args.screening_sensitivity,
                diagnosis_method=args.diagnosis_method,
                intended_use=args.intended_use,
                limitations=args.limitations,
                roc_png=args.roc,
            )
        except ParityError as exc:
            print(f"export failed: {exc}", file=sys.stderr)
            return 1
        model_dir = Path(args.out)
        val = card.metrics["validation"]
        print(
            f"wrote {model_dir}/model.onnx and model_card.json ({card.architecture}, "
            f"{card.heatmap_method} {card.heatmap_shape}, out-of-fold mean AUROC "
            f"{val.mean_auroc:.4f} (95% CI {val.mean_auroc_ci_low:.4f}-"
            f"{val.mean_auroc_ci_high:.4f}))"
        )
    elif args.run:
        if not args.out:
            print("export --run needs --out MODEL_DIR", file=sys.stderr)
            return 2
        from training.export import ParityError, export_run

        try:
            card = export_run(
                args.run,
                args.out,
                name=args.name,
                version=args.version,
                opset=args.opset,
                atol=args.atol,
                n_boot=args.bootstrap,
                target_sensitivity=args.screening_sensitivity,
                diagnosis_method=args.diagnosis_method,
                batch_size=args.batch_size,
                intended_use=args.intended_use,
                limitations=args.limitations,
                progress=args.progress,
                device=args.device,
                fp16=args.fp16,
                fp16_atol=args.fp16_atol,
                calibrate=args.calibrate,
            )
        except ParityError as exc:
            print(f"export failed: {exc}", file=sys.stderr)
            return 1
        model_dir = Path(args.out)
        val = card.metrics["validation"].mean_auroc
        print(
            f"wrote {model_dir}/model.onnx and model_card.json ({card.architecture}, "
            f"{card.heatmap_method}, val mean AUROC {'n/a' if val is None else f'{val:.4f}'})"
        )
    elif args.model:
        model_dir = Path(args.model)
    else:
        print(
            "export needs --run RUN_DIR --out MODEL_DIR, or --model MODEL_DIR --triton REPO",
            file=sys.stderr,
        )
        return 2
    if args.quantize:
        _quantize(args, model_dir)
    if args.triton:
        try:
            from training.triton import write_triton_repository
        except ImportError as exc:
            print(f"Triton export is unavailable (training.triton: {exc})", file=sys.stderr)
            return 1
        options = {
            "max_batch_size": args.triton_max_batch_size,
            "max_queue_delay_microseconds": args.triton_max_queue_delay_us,
            "instance_count": args.triton_instances,
            "kind": args.triton_kind,
        }
        write_triton_repository(
            model_dir, Path(args.triton), **{k: v for k, v in options.items() if v is not None}
        )
        print(f"wrote Triton repository {args.triton}")
    return 0


def _quantize(args: argparse.Namespace, model_dir: Path) -> None:
    """``export --quantize int8``: the int8 folder beside ``model_dir`` (training/quantize.py)."""
    import shlex

    from app.card import ModelCard
    from training.quantize import images_from_files, images_from_run, quantize_folder

    run_dir = args.val_run or args.run
    validation = calibration = None
    if run_dir:
        validation = images_from_run(run_dir, "val")
        calibration = images_from_run(run_dir, "train", limit=128)
    else:
        data = Path(os.environ.get("CXR_DATA_DIR", "../shared/data")) / "nih/images/nih-1024"
        files = sorted(data.glob("*.png"))[:64]
        if files:  # no labels known for a bare folder: parity and flipped decisions only
            calibration = images_from_files(files, ModelCard.load(model_dir / "model_card.json"))
            validation = calibration
    out = Path(args.quantize_out or f"{str(model_dir).rstrip('/')}-int8")
    card = quantize_folder(
        model_dir,
        out,
        method=args.quantize_method,
        calibration=calibration,
        validation=validation,
        seconds=args.quantize_seconds,
        command="cxr-triage " + shlex.join(sys.argv[1:]),
    )
    print(f"wrote {out}/model.onnx and model_card.json ({card.name} {card.version})")


def _download(argv: list[str]) -> int:
    try:
        from training.download import main as download_main
    except ImportError as exc:
        print(f"`download` is unavailable (training.download: {exc})", file=sys.stderr)
        return 1
    return int(download_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one training sub-command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads made
    # 2-thread training 10-25x slower than 1 thread (docs/training.md). Must precede torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv and argv[0] == "download":
        return _download(argv[1:])
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "cache": _cache,
        "train": _train,
        "crossval": _crossval,
        "evaluate": _evaluate,
        "compare": _compare,
        "export": _export,
    }
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"cxr-triage {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
