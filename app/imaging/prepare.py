"""One upload's pixels to the model's input: decode, then preprocess (runs in the decode pool)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from app.api.problems import Problem
from app.card import ModelCard
from app.imaging.decode import DecodedImage, DecodeError, decode_image
from app.imaging.preprocess import to_model_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    decoded: DecodedImage
    model_input: np.ndarray
    seconds: float


def prepare(data: bytes, content_type: str | None, card: ModelCard, max_pixels: int) -> Prepared:
    """Decode and preprocess one upload (runs in the decode pool, off the event loop)."""
    start = time.perf_counter()
    try:
        decoded = decode_image(data, content_type=content_type, max_pixels=max_pixels)
    except DecodeError:
        raise
    except Exception as exc:
        # decode_image promises DecodeError only; should a file still find a bug, the client
        # gets a 4xx for its bad upload and the traceback goes to the log, not to the client.
        logger.error("decoder raised %s", type(exc).__name__, exc_info=exc)
        raise Problem(422, "The image could not be decoded.", slug="undecodable-image") from exc
    model_input = np.ascontiguousarray(to_model_input(decoded.pixels, card.input), np.float32)
    expected = (3, card.input.height, card.input.width)
    if model_input.shape != expected:
        raise RuntimeError(f"preprocessing gave {model_input.shape}, expected {expected}")
    return Prepared(decoded, model_input, time.perf_counter() - start)
