"""Heatmap overlay: the model's coarse ``[h, w]`` map drawn over the image it looked at.

The overlay is sized like the model input (what the model saw, not the original upload), the map
upsampled bilinearly, coloured with a jet-like lookup table and alpha-blended over the grayscale.
Only numpy and Pillow: serving carries no matplotlib.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from app.card import InputSpec


def _jet_lut() -> np.ndarray:
    """256x3 uint8 jet colormap (blue → cyan → yellow → red), the usual piecewise-linear form."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.round(255.0 * rgb).astype(np.uint8)


JET = _jet_lut()


def model_input_gray(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Undo the card's normalisation of a ``[3,H,W]`` model input: ``[H,W]`` in [0, 1]."""
    return np.clip(pixels[0] * spec.std[0] + spec.mean[0], 0.0, 1.0)


def overlay(gray: np.ndarray, grid: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 ``[H,W,3]``: ``grid`` (values in [0,1]) upsampled to ``gray``'s size, blended."""
    height, width = gray.shape
    heat = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32))
    heat_up = np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR))
    index = np.clip(np.rint(heat_up * 255.0), 0, 255).astype(np.uint8)
    colour = JET[index].astype(np.float32)
    base = (np.clip(gray, 0.0, 1.0) * 255.0)[..., None]
    return np.rint((1.0 - alpha) * base + alpha * colour).astype(np.uint8)


def overlay_png_base64(pixels: np.ndarray, spec: InputSpec, grid: np.ndarray) -> str:
    """The base64 PNG of :func:`overlay` for a normalised ``[3,H,W]`` model input."""
    rgb = overlay(model_input_gray(pixels, spec), grid)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=6)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
