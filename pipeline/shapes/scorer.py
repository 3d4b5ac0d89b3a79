"""The analytic scorer of the shapes demo: reads colour, shape, size, position and background off a generated
image and compares them with what its prompt asked for (pipeline/shapes/dataset.py makes the data and prompts)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.shapes.dataset import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_shape,
    parse_prompt,
)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = ((np.array([palette[n] for n in names], dtype=np.float32) - rgb) ** 2).sum(1)
    return names[int(dist.argmin())]


def _find_object(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background colour, per-pixel colour distance from it, mask of the largest connected region that differs
    from it) of an (R, R, 3) float image; the background is the median colour of the border pixels."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    mask = dist > 60
    labels, n = ndimage.label(mask)
    if n == 0:
        return bg_rgb, dist, mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return bg_rgb, dist, labels == (int(np.argmax(sizes)) + 1)


def object_mask(image: Image.Image) -> np.ndarray:
    """(R, R) bool: the pixels of the image's object (the largest region unlike the background), as the scorer
    sees it; all False for a blank image. Compared with a doodle's filled mask to measure outline adherence."""
    return _find_object(np.asarray(image.convert("RGB"), dtype=np.float32))[2]


def analyse(image: Image.Image) -> dict[str, str] | None:
    """Read colour, shape, size, position and background off an image; None when no object is found."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    res = arr.shape[0]
    bg_rgb, dist, obj = _find_object(arr)
    if obj.sum() < 4:
        return None
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    core = obj & (dist >= np.percentile(dist[obj], 50))  # the object's interior, not its blended edge
    colour = _nearest(np.median(arr[core], axis=0), COLOURS)
    # shape: which template drawn into the object's bounding box overlaps the mask best
    best, best_iou = "square", -1.0
    for shape in SHAPES:
        ss = 4
        tmpl = Image.new("L", (res * ss, res * ss), 0)
        draw_shape(ImageDraw.Draw(tmpl), shape, (x0 * ss, y0 * ss, x1 * ss, y1 * ss), 255)
        t = np.asarray(tmpl.resize((res, res), Image.Resampling.BOX)) > 127
        iou = (t & obj).sum() / max((t | obj).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    extent = max(y1 - y0, x1 - x0) / res
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    cy, cx = (y0 + y1) / 2 / res, (x0 + x1) / 2 / res  # box centre: a triangle's mass sits low in its box
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    position = next(name for name, cr in POSITIONS.items() if cr == (col, row))
    return {"colour": colour, "shape": best, "size": size, "position": position,
            "background": _nearest(bg_rgb, BACKGROUNDS)}


ATTRIBUTES = ("colour", "shape", "size", "position", "background")


def score(items: Iterable[tuple[Image.Image, str]]) -> dict:
    """Prompt adherence per attribute, for colour+shape jointly and for all attributes, split into
    seen and held-out colour x shape pairs. Each item is (image, prompt)."""
    groups: dict[str, dict[str, list[bool]]] = {"seen": {}, "held_out": {}, "all": {}}
    per_item = []
    for image, prompt in items:
        want = parse_prompt(prompt)
        got = analyse(image) or {}
        pair = (want.get("colour"), want.get("shape"))
        group = "held_out" if pair in HELD_OUT_PAIRS else "seen"
        checks = {a: got.get(a) == want[a] for a in ATTRIBUTES if a in want}
        if "colour" in want and "shape" in want:
            checks["colour+shape"] = checks["colour"] and checks["shape"]
        checks["all"] = all(checks.values()) if checks else False
        for g in (group, "all"):
            for k, ok in checks.items():
                groups[g].setdefault(k, []).append(ok)
        per_item.append({"prompt": prompt, "group": group, "found": got, "checks": checks})
    summary = {
        g: {k: round(sum(v) / len(v), 4) for k, v in d.items()} | {"n": len(next(iter(d.values()), []))}
        for g, d in groups.items()
    }
    return {"summary": summary, "items": per_item}
