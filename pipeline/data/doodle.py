"""Doodles: the sketch a condition-image model is trained on and prompted with.

`doodle_from_image` is the built-in transform that turns any training image into a hand-sketch-like
condition (black lines on white: the image's colour edges, thickened and wobbled), so any image-text set can
train a sketch model. `load_doodle` brings a user's sketch file to the model resolution without its thin lines
fading away, and `filled_mask` / `iou` measure how well a generated shape follows a doodle's outline.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps
from scipy import ndimage

from pipeline.images import condition_tensor, open_image, to_rgb

INK, PAPER = 0, 255
EDGE_FRACTION = 0.25  # an edge is at least this share of the image's strongest colour gradient...
EDGE_FLOOR = 48.0  # ...and at least a ~12-level step (Sobel of a step s is 4s): flat-ish noise draws nothing
SMOOTHNESS = 0.15  # of the image side: the wobble's length scale (a hand drifts, it does not shake)
FIELD_GRID = 16  # the displacement field is drawn on this grid and resized to the image


def line_width(resolution: int) -> int:
    """Default stroke width: one pixel per 32 of the image side."""
    return max(1, resolution // 32)


def edge_map(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels on a colour edge. The gradient is taken per channel and the largest kept, so a yellow
    shape on white (a faint edge in grey) still gets its outline; the threshold is relative to the image.
    Beyond the frame the background (the border's median colour) is taken to continue, so a shape cut by the
    frame still gets a closed outline there."""
    x = np.asarray(rgb, dtype=np.float32)
    canvas = np.empty((x.shape[0] + 2, x.shape[1] + 2, 3), dtype=np.float32)
    canvas[:] = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), axis=0)
    canvas[1:-1, 1:-1] = x
    magnitude = np.max([np.hypot(ndimage.sobel(canvas[..., c], 0), ndimage.sobel(canvas[..., c], 1))
                        for c in range(3)], axis=0)[1:-1, 1:-1]
    return magnitude >= max(EDGE_FRACTION * float(magnitude.max()), EDGE_FLOOR)


def doodle_from_image(rgb: np.ndarray, seed: int, *, thickness: int | None = None,
                      jitter: float = 0.02) -> np.ndarray:
    """(R, R, 3) uint8 image -> (R, R, 3) uint8 doodle, black lines on white, deterministic per seed.

    Lines follow the colour edges (a Sobel edge is ~2 px wide: both sides of the step), are dilated to
    `thickness` px (default `line_width(R)`), then displaced by a smooth random field of amplitude `jitter`*R px
    so they wobble like a hand drawing instead of tracing the image exactly."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    lines = edge_map(rgb)
    width = line_width(min(h, w)) if thickness is None else thickness
    grow = max(0, (width - 1) // 2)  # per side, beyond the Sobel band's own 2 px
    if grow and lines.any():
        lines = ndimage.binary_dilation(lines, ndimage.generate_binary_structure(2, 1), iterations=grow)
    if jitter > 0 and lines.any():
        lines = _wobble(lines, np.random.default_rng(seed), jitter * min(h, w))
    out = np.full((h, w, 3), PAPER, dtype=np.uint8)
    out[lines] = INK
    return out


def _wobble(lines: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Resample a line mask through a smooth random displacement field whose largest shift is `amplitude` px."""
    h, w = lines.shape
    # smoothed noise on a coarse grid, resized: the same wobble at any resolution, and ~40x cheaper at 256 px
    # than blurring full-size noise with a kernel a sixth of the image wide
    coarse = [ndimage.gaussian_filter(rng.standard_normal((FIELD_GRID, FIELD_GRID)), SMOOTHNESS * FIELD_GRID,
                                      mode="wrap").astype(np.float32) for _ in range(2)]
    field = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.Resampling.BICUBIC))
                      for c in coarse]).astype(np.float64)
    field *= amplitude / max(float(np.abs(field).max()), 1e-12)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # pinned at the frame, easing in over the wobble's length scale: a line along the frame cannot slide off it
    to_frame = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    field *= np.clip(to_frame / (SMOOTHNESS * min(h, w)), 0.0, 1.0)
    moved = ndimage.map_coordinates(lines.astype(np.float32), [yy + field[0], xx + field[1]], order=1,
                                    mode="nearest")
    return moved >= 0.5  # bilinear resampling of a >= 2 px band keeps it connected at sub-band shifts


def ink(doodle: np.ndarray) -> np.ndarray:
    """(H, W) bool: the doodle's dark (line) pixels."""
    d = np.asarray(doodle)
    return (d.min(-1) if d.ndim == 3 else d) < 128


def filled_mask(doodle: np.ndarray) -> np.ndarray:
    """(H, W) bool: the line pixels plus every region they enclose, i.e. the shape the doodle outlines."""
    return ndimage.binary_fill_holes(ink(doodle))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def load_doodle(image: Image.Image, resolution: int) -> np.ndarray:
    """A user's sketch of any size and mode -> (R, R, 3) uint8 at the model resolution.

    EXIF orientation and RGB as ingest converts, centre crop to a square, and before downscaling by k every dark
    line is thickened to ~k px (a minimum filter) so the box filter's average keeps it dark instead of fading
    a 1 px pen stroke to 1/k of its ink."""
    img = to_rgb(ImageOps.exif_transpose(image), [])
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side == resolution:
        return np.asarray(img, dtype=np.uint8).copy()
    if side < resolution:
        return np.asarray(img.resize((resolution, resolution), Image.Resampling.BICUBIC), dtype=np.uint8)
    k = side / resolution
    size = math.ceil(k) | 1  # odd: the thickened line stays centred where it was drawn
    if size > 1:
        # scipy's separable filter: PIL's MinFilter costs size^2 per pixel, too slow for a photo-sized canvas
        thick = ndimage.minimum_filter(np.asarray(img), size=(size, size, 1), mode="nearest")
        img = Image.fromarray(thick)
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX), dtype=np.uint8)


def doodle_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """A stored or uploaded doodle's image bytes -> the (3, R, R) condition tensor the model takes; UserError when
    the bytes are not an image."""
    return condition_tensor(load_doodle(open_image(data, "the doodle"), resolution))
