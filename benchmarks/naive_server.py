"""The baseline for ``serve_bench.py``: the FastAPI server a user writes in ten minutes.

Pillow decode, resize and normalise in the handler, one ``session.run`` per request, no batching,
no queue, no pool. Same model folder (model.onnx + card), same multipart field ``file`` and a
JSON answer of about the same size as the service's (per-label probability and both flags), so a
ratio against it measures what the service's machinery adds or costs. Two variants, as FastAPI's
docs present them:

- ``--mode async``: ``async def`` handler; decode and inference block the event loop, so requests
  run one after another;
- ``--mode sync``: ``def`` handler; FastAPI runs it in its thread pool (40 threads), so several
  ``session.run`` calls share ONNX Runtime's intra-op threads at once.

    .venv/bin/python benchmarks/naive_server.py --model-dir models/default --port 8001

The session gets only what a careful user sets: ``intra_op_num_threads`` (same as the service's);
everything else is ONNX Runtime's default.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class Model:
    """The model folder as a naive server holds it: a session and the card's JSON."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        card = json.loads((model_dir / "model_card.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"),
            sess_options=opts,
            providers=ort.get_available_providers(),
        )
        spec = card["input"]
        self.size = (int(spec["width"]), int(spec["height"]))
        self.filter = FILTERS[spec.get("interpolation", "bicubic")]
        self.mean = np.asarray(spec["mean"], np.float32)[:, None, None]
        self.std = np.asarray(spec["std"], np.float32)[:, None, None]
        self.labels: list[str] = card["labels"]
        self.screening = [card["thresholds"]["screening"][lbl]["threshold"] for lbl in self.labels]
        self.diagnosis = [card["thresholds"]["diagnosis"][lbl]["threshold"] for lbl in self.labels]

    def predict(self, data: bytes) -> dict[str, Any]:
        image = Image.open(io.BytesIO(data)).convert("L").resize(self.size, self.filter)
        gray = np.asarray(image, np.float32) / 255.0
        x = ((np.repeat(gray[None], 3, axis=0) - self.mean) / self.std)[None]
        logits, _ = self.session.run(["logits", "heatmap"], {"pixel_values": x})
        probs = 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64)))
        return {
            "findings": [
                {
                    "label": label,
                    "probability": float(p),
                    "screening_positive": bool(p >= s),
                    "diagnosis_positive": bool(p >= d),
                }
                for label, p, s, d in zip(
                    self.labels, probs, self.screening, self.diagnosis, strict=True
                )
            ]
        }


def create_app(model_dir: Path, threads: int, mode: str) -> FastAPI:
    """The naive app; ``mode`` is ``async`` or ``sync`` (see the module docstring)."""
    model = Model(model_dir, threads)
    app = FastAPI(title="naive baseline")

    if mode == "async":

        @app.post("/predict")
        async def predict_async(file: UploadFile = File(...)) -> dict[str, Any]:
            return model.predict(await file.read())

    else:

        @app.post("/predict")
        def predict_sync(file: UploadFile = File(...)) -> dict[str, Any]:
            return model.predict(file.file.read())

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    args = p.parse_args(argv)
    app = create_app(args.model_dir, args.threads, args.mode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
