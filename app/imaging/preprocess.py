"""Decoded grayscale -> model input: the same resize for the training cache and for serving.

Resizing runs in Pillow's 32-bit float mode ("F"), so a 16-bit DICOM keeps its precision until
the model sees it, and Pillow's resampling is antialiased when shrinking (the support of the
filter grows with the scale), unlike a plain interpolating resize.

An image whose aspect ratio differs from the card's height:width (a 35x43 cm detector) reaches
that size as the card's ``input.resize`` says, i.e. as the model was trained: ``squash``
(stretch; the bundled models, trained on square NIH images), ``pad`` (fit inside, black borders)
or ``center_crop`` (fill, crop the centre). For a square image all three are the same resize.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from app.card import InputSpec, ResizeMode

_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Pillow first box-reduces by an integer factor while the image stays >= 3x the target, then
# resamples. Pillow documents 3.0 as indistinguishable from a full resample; here it changes
# nothing for 1024 -> 224 (factor 4.6 < 2 x 3) and halves the time for 2-3k px DICOMs.
REDUCING_GAP = 3.0


def as_unit_float(pixels: np.ndarray) -> np.ndarray:
    """float32 view of a grayscale image in [0, 1]; uint8 (a training cache) is divided by 255."""
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1 / 255)
    return arr.astype(np.float32, copy=False)


def resize_gray(
    pixels: np.ndarray, height: int, width: int, interpolation: str = "bicubic"
) -> np.ndarray:
    """Antialiased resize of a 2-D grayscale image in [0, 1] to ``height`` x ``width``.

    The result is float32 and clipped to [0, 1]: bicubic and Lanczos overshoot at edges, and the
    training cache (uint8) clips them too, so serving must see the same values.
    """
    try:
        resample = _FILTERS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; use one of {sorted(_FILTERS)}"
        ) from None
    arr = as_unit_float(pixels)
    if arr.shape == (height, width):
        return np.clip(arr, 0.0, 1.0)
    image = Image.fromarray(np.ascontiguousarray(arr))
    resized = image.resize((width, height), resample=resample, reducing_gap=REDUCING_GAP)
    out = np.array(resized, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def fit_gray(
    pixels: np.ndarray,
    height: int,
    width: int,
    interpolation: str = "bicubic",
    resize: ResizeMode = "squash",
) -> np.ndarray:
    """:func:`resize_gray` to ``height`` x ``width`` with the aspect-ratio policy ``resize``."""
    arr = as_unit_float(pixels)
    rows, cols = arr.shape
    if resize == "squash" or rows * width == cols * height:
        return resize_gray(arr, height, width, interpolation)
    if resize == "center_crop":
        # Crop the source to the target's aspect first: fewer pixels to resample.
        if rows * width > cols * height:  # taller than the target
            keep = max(1, round(cols * height / width))
            top = (rows - keep) // 2
            arr = arr[top : top + keep]
        else:
            keep = max(1, round(rows * width / height))
            left = (cols - keep) // 2
            arr = arr[:, left : left + keep]
        return resize_gray(arr, height, width, interpolation)
    if resize == "pad":
        scale = min(height / rows, width / cols)
        inner_h = min(height, max(1, round(rows * scale)))
        inner_w = min(width, max(1, round(cols * scale)))
        out = np.zeros((height, width), dtype=np.float32)
        top, left = (height - inner_h) // 2, (width - inner_w) // 2
        out[top : top + inner_h, left : left + inner_w] = resize_gray(
            arr, inner_h, inner_w, interpolation
        )
        return out
    raise ValueError(f"unknown resize mode {resize!r}; use squash, pad or center_crop")


def to_model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize to the card's size (its aspect policy), replicate to 3 channels, normalise:
    float32 [3, H, W]."""
    gray = fit_gray(pixels, spec.height, spec.width, spec.interpolation, spec.resize)
    out = np.empty((3, spec.height, spec.width), dtype=np.float32)
    for channel, (mean, std) in enumerate(zip(spec.mean, spec.std, strict=True)):
        np.subtract(gray, np.float32(mean), out=out[channel])
        out[channel] *= np.float32(1.0 / std)
    return out
