"""Load an image-text imagefolder (metadata.jsonl + images) into memory as one uint8 tensor.

Images are decoded once per training process, never per step. A bad item is skipped with its reason;
the rest load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ImageTextSet:
    images: torch.Tensor  # (N, 3, R, R) uint8
    captions: list[str]
    labels: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def to_square(img: Image.Image, resolution: int) -> Image.Image:
    """EXIF orientation, RGB, shorter side to `resolution`, centre crop."""
    img = ImageOps.exif_transpose(img).convert("RGB")
    if img.size != (resolution, resolution):
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    return img


def load_imagefolder(path: Path, resolution: int, caption_column: str = "text",
                     label_column: str | None = None) -> ImageTextSet:
    path = Path(path)
    meta = path / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{path}: no metadata.jsonl. A dataset is a folder of images plus metadata.jsonl with "
                        f"'file_name' and '{caption_column}' on each line (make one with `diffuse data shapes`).")
    arrays, captions, labels, skipped = [], [], [], []
    root = path.resolve()
    for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name = rec["file_name"]
            text = rec.get(caption_column)
            if not isinstance(text, str):
                raise ValueError(f"no '{caption_column}' text")
            file = (path / name).resolve()
            if not file.is_relative_to(root):
                raise ValueError(f"file_name {name!r} points outside the dataset")
            with Image.open(file) as im:
                arrays.append(np.asarray(to_square(im, resolution)))
            captions.append(text)
            if label_column:
                labels.append(str(rec.get(label_column, "")))
        except Exception as e:  # one bad record never stops the rest
            skipped.append((f"metadata.jsonl line {n}", str(e)))
    if skipped:
        log.warning("skipped %d bad items, e.g. %s: %s", len(skipped), *skipped[0])
    if not arrays:
        raise UserError(f"{path}: no usable image-caption pairs ({len(skipped)} bad items)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageTextSet(images, captions, labels if label_column else None, skipped)


def batch_indices(n: int, seed: int, start: int, size: int) -> torch.Tensor:
    """Items for the samples start..start+size of the training stream: a fresh permutation each epoch,
    seeded by (seed, epoch), so any position in the stream can be reproduced after a resume."""
    out = []
    pos = start
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        perm = _perm(n, seed, epoch)
        take = min(size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=g)
    return _PERM_CACHE[key]
