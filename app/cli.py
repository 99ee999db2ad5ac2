"""``cxr-triage``: one command line for serving, auditing and the training pipeline.

``serve`` and ``audit`` live in ``app``; ``cache | train | evaluate | export | download`` belong to
``training`` and are imported only when asked for, so ``serve`` and ``--help`` never load torch and
a serving-only install (no ``[train]`` extra) still has a working CLI.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

SERVE_HELP = (
    "run the service on the model folder: HTTP (uvicorn), and the DICOM SCP on CXR_DICOM_PORT"
)
AUDIT_HELP = "read the audit trail of predictions"
TRAINING_COMMANDS: dict[str, str] = {
    "cache": "decode images once and cache them for training",
    "crossval": "patient-wise k-fold cross-validation (out-of-fold AUROC, fold models)",
    "train": "train a model on NIH ChestX-ray14 images",
    "evaluate": "evaluate a trained run (AUROC, calibration, subgroups, thresholds)",
    "compare": "paired patient-level bootstrap comparison of two runs on the same images",
    "export": "export a run to a model folder (model.onnx + model_card.json) or a Triton repo",
    "download": "download the NIH ChestX-ray14 archives (resumable, checksummed)",
}
OVERLAY_HELP = "score one image and write its heatmap overlay PNG (what /predict returns)"
TRAIN_EXTRA_HINT = "pip install 'cxr-triage[train]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Chest X-ray triage: serve an ONNX model over HTTP, or train and export one. "
        "Not a medical device.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    serve.add_argument(
        "--host",
        default=os.environ.get("HOST", "127.0.0.1"),
        help="interface to bind (default: $HOST or 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT", "8000")),
        help="port (default: $PORT or 8000)",
    )
    serve.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model folder (default: $CXR_MODEL_DIR or models/default)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, each with its own ONNX session; on a CPU-only "
        "host one process using all cores is fastest (default: 1)",
    )
    serve.add_argument(
        "--log-level", default=None, help="uvicorn log level (default: $CXR_LOG_LEVEL)"
    )
    overlay = commands.add_parser("overlay", help=OVERLAY_HELP, description=OVERLAY_HELP)
    overlay.add_argument("image", type=Path, help="PNG, JPEG or DICOM radiograph")
    overlay.add_argument("--out", type=Path, required=True, help="PNG file to write")
    overlay.add_argument(
        "--model-dir", type=Path, default=None, help="model folder (default: models/default)"
    )
    overlay.add_argument(
        "--finding", default=None, help="label to explain (default: the top flagged finding)"
    )
    overlay.add_argument("--max-side", type=int, default=1024, help="long side cap (1024)")
    commands.add_parser("audit", help=AUDIT_HELP, add_help=False)
    for name, text in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=text + " (needs the [train] extra)", add_help=False)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Check the model folder, then hand over to uvicorn with the app factory."""
    from app.inference.runtime import ModelLoadError, check_model_folder
    from app.settings import Settings

    if args.model_dir is not None:
        # The factory reads settings from the environment, in this and in worker processes.
        os.environ["CXR_MODEL_DIR"] = str(args.model_dir.resolve())
    settings = Settings()
    try:
        check_model_folder(settings.model_dir)
    except ModelLoadError as exc:
        print(f"cxr-triage serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.pacs_enabled:
        # One DICOM port, one study database, one outbox: two processes would race on them.
        print(
            "cxr-triage serve: the PACS side (DICOM SCP, study state, outbox) runs in one "
            "process; use --workers 1, or CXR_PACS_ENABLED=false for an HTTP-only service",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    # uvicorn re-raises SIGTERM once its graceful shutdown (after the app's drain) is done; by then
    # the signal has been handled, so the process should end with status 0, not die of it.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=(args.log_level or settings.log_level).lower(),
    )
    return 0


def overlay(args: argparse.Namespace) -> int:
    """The /predict heatmap path on one file: decode, run, pick the finding, render, save."""
    from PIL import Image

    from app.imaging.decode import decode_image
    from app.imaging.heatmap import explained_label, render_overlay, select_map
    from app.imaging.preprocess import to_model_input
    from app.inference.runtime import ModelLoadError, ModelRuntime
    from app.inference.scoring import score
    from app.settings import DEFAULT_MODEL_DIR

    try:
        runtime = ModelRuntime.load(args.model_dir or DEFAULT_MODEL_DIR, providers="cpu")
    except ModelLoadError as exc:
        print(f"cxr-triage overlay: {exc}", file=sys.stderr)
        return 2
    card = runtime.card
    if args.finding is not None and args.finding not in card.labels:
        print(f"cxr-triage overlay: --finding must be one of {card.labels}", file=sys.stderr)
        return 2
    decoded = decode_image(args.image.read_bytes())
    logits, heat = runtime.run(to_model_input(decoded.pixels, card.input)[None])
    findings, triage = score(card, logits[0])
    probs = [f.probability for f in findings]
    label = explained_label(card.labels, probs, triage.screening_positive, args.finding)
    index = card.labels.index(label)
    rgb = render_overlay(
        decoded.pixels,
        select_map(heat[0], index),
        finding=label,
        probability=probs[index],
        max_side=args.max_side,
        resize=card.input.resize,
        input_size=(card.input.height, card.input.width),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(args.out, optimize=True)
    flagged = ", ".join(triage.screening_positive) or "none"
    print(
        f"wrote {args.out} ({rgb.shape[1]}x{rgb.shape[0]}): {label} p={probs[index]:.3f}; "
        f"screening-positive: {flagged}"
    )
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_training_command(argv: list[str]) -> int:
    """Delegate to ``training.cli.main``; explain what to install when it is missing."""
    try:
        from training.cli import main as training_main
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "training":
            what = "the training package (a source checkout of cxr-triage)"
        else:
            what = f"the training dependencies (missing module {exc.name!r})"
        print(
            f"cxr-triage {argv[0]}: needs {what}. Install them with: {TRAIN_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2
    return int(training_main(argv) or 0)


def run_audit(argv: list[str]) -> int:
    from app.ops.audit import main as audit_main

    return int(audit_main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-triage`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in TRAINING_COMMANDS:
        return run_training_command(args_list)
    if args_list and args_list[0] == "audit":
        return run_audit(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "overlay":
        return overlay(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
