"""Heatmap overlay: the model's coarse map drawn over the uploaded image, at the image's own aspect.

The model sees the whole upload squeezed to its input size, so its ``[h, w]`` map covers the whole
image: it is upsampled (bicubic, clipped to [0, 1]) straight to the upload's shape, whatever its
aspect. The colour is blended with an opacity that grows with the map's value, so anatomy stays
visible where the model found little evidence; a scale bar (0..1), the finding (and its
probability) and a "not for diagnostic use" caption are burned in. The same renderer makes the
``POST /predict`` overlay (long side <= 1024) and the PACS Secondary Capture (<= 2048).

Only numpy and Pillow (Pillow's bundled FreeType font, ``ImageFont.load_default(size=...)``):
serving carries neither matplotlib nor torch.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CAPTION = "AI heatmap: unverified AI result, not for diagnostic use"
MAX_ALPHA = 0.6  # opacity of the colour where the map is 1


def _jet_lut() -> np.ndarray:
    """256x3 uint8 jet colormap (blue → cyan → yellow → red), the usual piecewise-linear form."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=1)
    return np.round(255.0 * rgb).astype(np.uint8)


JET = _jet_lut()

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=64)
def _font(size: int) -> Font:
    """Pillow's bundled font at ``size`` px (FreeType); the bitmap default if FreeType is absent."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def select_map(heatmap: np.ndarray, index: int) -> np.ndarray:
    """The ``[h, w]`` map for label ``index`` of a ``[L, h, w]`` output (or the single ``[h, w]``).

    Models with one map per image (``[N, h, w]``) explain every label with the same map.
    """
    heatmap = np.asarray(heatmap)
    if heatmap.ndim == 2:
        return heatmap
    if heatmap.ndim == 3:
        return heatmap[index]
    raise ValueError(f"a per-image heatmap is [h, w] or [L, h, w], not {list(heatmap.shape)}")


def explained_label(
    labels: Sequence[str],
    probabilities: Sequence[float],
    flagged: Sequence[str],
    requested: str | None = None,
) -> str:
    """Which finding a heatmap explains: the one asked for, else the most probable flagged one.

    With nothing flagged, the most probable finding other than "No Finding" (a map is always
    about a finding). ``requested`` must be one of ``labels`` (the caller validates it).
    """
    if requested is not None:
        return requested
    prob = dict(zip(labels, probabilities, strict=True))
    pool = [lbl for lbl in flagged if lbl in prob] or [lbl for lbl in labels if lbl != "No Finding"]
    return max(pool or list(labels), key=lambda lbl: prob[lbl])


def _fit_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: float) -> Font:
    """The largest font up to ``size`` at which ``text`` fits in ``max_width`` (at least 6 px)."""
    while size > 6:
        font = _font(size)
        if draw.textlength(text, font=font) <= max_width:
            return font
        size = int(size * 0.85)
    return _font(6)


def _output_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _heat_on_image(
    heatmap: np.ndarray,
    out_h: int,
    out_w: int,
    resize: str,
    input_size: tuple[int, int] | None,
) -> np.ndarray:
    """The map upsampled onto the output image, undoing the card's aspect policy.

    ``squash`` (the bundled models): the map covers the whole image. ``pad``: the model input
    holds the image letterboxed, so only the map's inner part is the image. ``center_crop``: the
    map covers the image's central crop; the cropped-off margins get no heat.
    """
    heat_img = Image.fromarray(np.nan_to_num(np.clip(heatmap, 0.0, 1.0)), mode="F")
    bicubic = Image.Resampling.BICUBIC
    if resize == "squash" or input_size is None:
        return np.asarray(heat_img.resize((out_w, out_h), bicubic))
    in_h, in_w = input_size
    up = heat_img.resize((in_w, in_h), bicubic)
    if resize == "pad":
        scale = min(in_h / out_h, in_w / out_w)
        inner_h = min(in_h, max(1, round(out_h * scale)))
        inner_w = min(in_w, max(1, round(out_w * scale)))
        top, left = (in_h - inner_h) // 2, (in_w - inner_w) // 2
        inner = up.crop((left, top, left + inner_w, top + inner_h))
        return np.asarray(inner.resize((out_w, out_h), Image.Resampling.BILINEAR))
    if resize == "center_crop":
        out = np.zeros((out_h, out_w), dtype=np.float32)
        if out_h * in_w > out_w * in_h:  # taller than the input: rows were cropped
            keep_h, keep_w = max(1, round(out_w * in_h / in_w)), out_w
        else:
            keep_h, keep_w = out_h, max(1, round(out_h * in_w / in_h))
        top, left = (out_h - keep_h) // 2, (out_w - keep_w) // 2
        crop = np.asarray(up.resize((keep_w, keep_h), Image.Resampling.BILINEAR))
        out[top : top + keep_h, left : left + keep_w] = crop
        return out
    raise ValueError(f"unknown resize mode {resize!r}; use squash, pad or center_crop")


def render_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    *,
    finding: str,
    probability: float | None = None,
    max_side: int = 1024,
    caption: str = DEFAULT_CAPTION,
    resize: str = "squash",
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """uint8 RGB ``[H', W', 3]``: ``heatmap`` over ``image`` with legend, finding and caption.

    ``image`` is the decoded upload, float ``[H, W]`` in [0, 1] at source resolution; ``heatmap``
    a ``[h, w]`` map in [0, 1]. The aspect is kept and the long side is
    ``min(max_side, max(H, W))``: never upscaled above the source. ``resize`` and ``input_size``
    (the card's ``input.resize`` and ``(height, width)``) place the map where the model saw the
    image; the default (squash) stretches it over the whole image.
    """
    image = np.asarray(image, dtype=np.float32)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 2 or heatmap.ndim != 2:
        raise ValueError(f"image and heatmap must be 2-D, not {image.shape} and {heatmap.shape}")
    if max_side < 1:
        raise ValueError("max_side must be positive")
    out_h, out_w = _output_size(*image.shape, max_side)
    gray_img = Image.fromarray(np.clip(image, 0.0, 1.0), mode="F")
    if gray_img.size != (out_w, out_h):
        gray_img = gray_img.resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    gray = np.clip(np.asarray(gray_img), 0.0, 1.0) * 255.0
    heat = np.clip(_heat_on_image(heatmap, out_h, out_w, resize, input_size), 0.0, 1.0)
    colour = JET[np.rint(heat * 255.0).astype(np.uint8)].astype(np.float32)
    alpha = (MAX_ALPHA * heat)[..., None]
    rgb = np.rint((1.0 - alpha) * gray[..., None] + alpha * colour).astype(np.uint8)
    canvas = Image.fromarray(rgb, mode="RGB")
    _annotate(canvas, finding=finding, probability=probability, caption=caption)
    return np.asarray(canvas)


def _annotate(
    canvas: Image.Image, *, finding: str, probability: float | None, caption: str
) -> None:
    """Burn in the title strip (finding), caption strip and a vertical 0..1 colour bar."""
    width, height = canvas.size
    short = min(width, height)
    size = max(7, round(short / 32))
    pad = max(1, size // 3)
    draw = ImageDraw.Draw(canvas, "RGBA")
    title = finding.replace("_", " ") + ("" if probability is None else f"  p={probability:.2f}")
    bar_w = max(3, round(short / 40))
    text_room = width - 2 * pad - 4 * bar_w
    title_font = _fit_font(draw, title, round(size * 1.2), text_room)
    caption_font = _fit_font(draw, caption, size, width - 2 * pad)
    top = _text_height(draw, title_font) + 2 * pad
    bottom = _text_height(draw, caption_font) + 2 * pad
    draw.rectangle((0, 0, width, top), fill=(0, 0, 0, 170))
    draw.rectangle((0, height - bottom, width, height), fill=(0, 0, 0, 170))
    draw.text((pad, pad), title, font=title_font, fill=(255, 255, 255, 255))
    draw.text((pad, height - bottom + pad), caption, font=caption_font, fill=(255, 230, 0, 255))
    # colour bar: right edge, between the strips, 1 at the top; ticks 1, 0.5, 0 to its left
    tick_font = _font(max(6, round(size * 0.8)))
    tick_w = draw.textlength("0.5", font=tick_font)
    x1 = width - pad
    x0 = x1 - bar_w
    y0 = top + pad + _text_height(draw, tick_font) // 2
    y1 = height - bottom - pad - _text_height(draw, tick_font) // 2
    if y1 - y0 < 8 or x0 - tick_w - 2 * pad < 0:
        return  # too small an image for a legend that can be read
    ramp = np.linspace(1.0, 0.0, y1 - y0)
    strip = np.repeat(JET[np.rint(ramp * 255).astype(np.uint8)][:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray(strip, mode="RGB"), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=(255, 255, 255, 255))
    for value, y in ((1.0, y0), (0.5, (y0 + y1) // 2), (0.0, y1)):
        text = f"{value:g}"
        tw = draw.textlength(text, font=tick_font)
        th = _text_height(draw, tick_font)
        draw.rectangle(
            (x0 - tw - 2 * pad, y - th // 2 - 1, x0 - 1, y + th // 2 + 1), fill=(0, 0, 0, 150)
        )
        draw.text((x0 - tw - pad, y - th // 2), text, font=tick_font, fill=(255, 255, 255, 255))


def _text_height(draw: ImageDraw.ImageDraw, font: Font) -> int:
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    return int(bottom - top) + 1


def png_base64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_png_base64(
    image: np.ndarray,
    heatmap: np.ndarray,
    *,
    finding: str,
    probability: float | None = None,
    max_side: int = 1024,
    caption: str = DEFAULT_CAPTION,
    resize: str = "squash",
    input_size: tuple[int, int] | None = None,
) -> str:
    """The base64 PNG of :func:`render_overlay` (the ``png_base64`` of ``POST /predict``)."""
    rgb = render_overlay(
        image,
        heatmap,
        finding=finding,
        probability=probability,
        max_side=max_side,
        caption=caption,
        resize=resize,
        input_size=input_size,
    )
    return png_base64(rgb)
