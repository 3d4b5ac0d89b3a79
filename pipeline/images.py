"""Every conversion between image files, PIL images, uint8 arrays and model tensors, in one place.

Conventions: a model tensor is (3, R, R) or (N, 3, R, R) float in [-1, 1]; a generated image is (3, R, R) uint8
(channels first, as torch keeps it); an array from a prepared dataset is (H, W, 3) uint8 ((R, R, 3) unless the
dataset is bucketed).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from pipeline.errors import UserError


def to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float scaled, transparency composited on white; `notes` says what."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        notes.append(f"{im.mode} scaled to 8-bit")
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("transparency composited on white")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return im.convert("RGB")


def fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """EXIF orientation, RGB (converted as ingest does), scaled to cover width x height and centre-cropped to it
    (for init images at sampling time)."""
    img = to_rgb(ImageOps.exif_transpose(img), [])
    if img.size != (width, height):
        img = ImageOps.fit(img, (width, height), Image.Resampling.BICUBIC)
    return img


def to_square(img: Image.Image, resolution: int) -> Image.Image:
    """`fit` to the square resolution x resolution."""
    return fit(img, resolution, resolution)


def open_image(source: Path | bytes, what: str = "image") -> Image.Image:
    """A local image file, or image bytes (a stored doodle), decoded in full; a missing or unreadable one is a
    UserError naming `what` (and the path)."""
    where = f" {source}" if isinstance(source, Path | str) else ""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            return im.copy()  # closing the file frees a loaded image's pixels; the copy keeps them
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"{what} not found:{where}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{what}{where} is not a readable image ({type(e).__name__}: {e})") from None


def image_to_tensor(img: Image.Image, width: int, height: int | None = None) -> torch.Tensor:
    """A PIL image -> (3, H, W) in [-1, 1] (H = height, default W: square), brought to that size by `fit`."""
    arr = np.asarray(fit(img, width, height or width), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def channels_first(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 arrays (a prepared dataset's) -> (n, 3, H, W) uint8, as generated images are kept."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def arrays_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 arrays -> (n, 3, H, W) float in [-1, 1], what the models take."""
    return channels_first(images).float().div(127.5).sub(1.0)


def condition_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(R, R, 3) uint8 condition image (a doodle) -> (3, R, R) in [-1, 1], as the trainer feeds it."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0  # a copy


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 0..255."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, R, R) uint8 -> a PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def crop_square(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) -> (n, S, S, 3), S = min(H, W): the centre square of each image (a view)."""
    height, width = images.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[:, top : top + side, left : left + side]


def resize_array(images: np.ndarray, resolution: int) -> np.ndarray:
    """(n, R, R, 3) uint8 -> (n, resolution, resolution, 3) uint8: area average down, bilinear up."""
    if images.shape[1] == resolution:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="area" if images.shape[1] > resolution else "bilinear")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def png_bytes(image: torch.Tensor, text: dict | None = None) -> bytes:
    """(3, R, R) uint8 -> PNG bytes; `text` goes into an iTXt chunk named "diffuse" (same pixels and text -> the same
    bytes)."""
    info = None
    if text is not None:
        info = PngInfo()
        info.add_itxt("diffuse", json.dumps(text, sort_keys=True))
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_base64(image: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def data_uri(image: Image.Image) -> str:
    """A PIL image as a data:image/png URI (embedded in HTML and markdown)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(data: bytes, px: int) -> str:
    """Image bytes -> a data URI of the image shrunk to at most `px` on its longer side."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if max(im.size) > px:
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
        return data_uri(im)


def save_pngs(images: torch.Tensor, out_dir: Path, names: list[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names, strict=True):
        p = out_dir / name
        to_pil(img).save(p)
        paths.append(p)
    return paths


def grid(images: torch.Tensor, cols: int = 8) -> Image.Image:
    """(N, 3, R, R) uint8 -> one PIL image, `cols` per row, the last row padded with black."""
    pil = [to_pil(im) for im in images]
    w, h = pil[0].size
    out = Image.new("RGB", (cols * w, (len(pil) + cols - 1) // cols * h), (0, 0, 0))
    for i, im in enumerate(pil):
        out.paste(im, (i % cols * w, i // cols * h))
    return out
