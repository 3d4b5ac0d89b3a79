"""Procedural demo data: coloured shapes with captions, the fixed evaluation prompt set, and a prompt parser.

The dataset is an imagefolder (HuggingFace convention): PNG files plus `metadata.jsonl` with `file_name`,
`text` and the attributes that made each image. Some colour x shape pairs are held out of training so the
scorer (pipeline/shapes/scorer.py) can report how well the model combines attributes it saw only separately.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.doodle import doodle_from_image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.34, "large": 0.5}  # side of the shape's bounding box, as a fraction of the image
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# 3x3 grid: name -> (column, row); centres sit at 0.25 / 0.5 / 0.75 of the image
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
GRID_CENTRES = (0.25, 0.5, 0.75)
DOODLE_DIR = "doodles"  # make_dataset(doodles=True): outline doodles, one per image, same file name
# One held-out pair per shape and no colour twice: every colour and shape is still seen in training.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})

_POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
_TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {bg} background",
    "{size} {colour} {shape}, {pos}, {bg} background",
    "a {colour} {shape} ({size}) {where}, on {bg}",
    "{pos}: a {size} {colour} {shape} on a {bg} background",
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


def caption(spec: ShapeSpec, template: int = 0) -> str:
    return _TEMPLATES[template % len(_TEMPLATES)].format(
        size=spec.size, colour=spec.colour, shape=spec.shape, where=_POSITION_PHRASES[spec.position],
        pos=spec.position, bg=spec.background,
    )


def shape_polygon_or_box(shape: str, box: tuple[float, float, float, float]):
    """Geometry of a shape filling `box` (x0, y0, x1, y1): an upward triangle, a square or a disc."""
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    return box


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    geometry = shape_polygon_or_box(shape, box)
    if shape == "circle":
        draw.ellipse(geometry, fill=fill)
    elif shape == "square":
        draw.rectangle(geometry, fill=fill)
    else:
        draw.polygon(geometry, fill=fill)


def render(spec: ShapeSpec, resolution: int, jitter: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Draw at 4x and downsample with a box filter: anti-aliased edges like a real photo's."""
    ss = 4
    size_px = resolution * ss
    img = Image.new("RGB", (size_px, size_px), BACKGROUNDS[spec.background])
    col, row = POSITIONS[spec.position]
    cx = (GRID_CENTRES[col] + jitter[0]) * size_px
    cy = (GRID_CENTRES[row] + jitter[1]) * size_px
    half = SIZES[spec.size] * size_px / 2
    draw_shape(ImageDraw.Draw(img), spec.shape, (cx - half, cy - half, cx + half, cy + half), COLOURS[spec.colour])
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def all_specs() -> list[ShapeSpec]:
    return [
        ShapeSpec(c, s, z, p, b)
        for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS for b in BACKGROUNDS
    ]


def make_dataset(out: Path, num_images: int, resolution: int = 32, seed: int = 0, doodles: bool = False) -> dict:
    """Write `num_images` training images (held-out pairs excluded) as an imagefolder. Deterministic.
    `doodles`: also an outline doodle per image (doodles/NNNNNN.png, seeded by the index), named in each
    metadata line's `conditioning_image` field (the diffusers ControlNet convention)."""
    rng = random.Random(seed)
    specs = [s for s in all_specs() if not s.held_out]
    out.mkdir(parents=True, exist_ok=True)
    if doodles:
        (out / DOODLE_DIR).mkdir(exist_ok=True)
    lines = []
    for i in range(num_images):
        spec = specs[rng.randrange(len(specs))]
        jitter = (rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025))
        name = f"{i:06d}.png"
        image = render(spec, resolution, jitter)
        image.save(out / name, optimize=False)
        record = {"file_name": name, "text": caption(spec, rng.randrange(len(_TEMPLATES))), **asdict(spec)}
        if doodles:
            record["conditioning_image"] = f"{DOODLE_DIR}/{name}"
            Image.fromarray(doodle_from_image(np.asarray(image), seed=i)).save(out / record["conditioning_image"],
                                                                               optimize=False)
        lines.append(json.dumps(record))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info = {
        "kind": "shapes", "num_images": num_images, "resolution": resolution, "seed": seed,
        "held_out_pairs": sorted(map(list, HELD_OUT_PAIRS)), "doodles": doodles,
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return info


def eval_prompts(per_pair: int = 8, seed: int = 1234) -> list[tuple[ShapeSpec, str]]:
    """The fixed evaluation prompt set: every colour x shape pair (seen and held out), `per_pair` times,
    with sizes, positions and backgrounds cycled so each pair covers a spread of layouts."""
    rng = random.Random(seed)
    positions = list(POSITIONS)
    out = []
    for c in COLOURS:
        for s in SHAPES:
            for k in range(per_pair):
                spec = ShapeSpec(c, s, list(SIZES)[k % len(SIZES)], positions[rng.randrange(9)],
                                 list(BACKGROUNDS)[rng.randrange(len(BACKGROUNDS))])
                out.append((spec, caption(spec, 0)))
    return out


def doodle_eval_items(per_pair: int = 4, seed: int = 4321, resolution: int = 32
                      ) -> list[tuple[ShapeSpec, str, np.ndarray]]:
    """The fixed doodle evaluation set: `eval_prompts` (every pair, layouts cycled) with the outline doodle of
    each spec's rendering, (spec, prompt, (R, R, 3) uint8 doodle). The doodle fixes where the shape goes and
    its outline; the prompt names its colour."""
    return [(spec, prompt, doodle_from_image(np.asarray(render(spec, resolution)), seed=k))
            for k, (spec, prompt) in enumerate(eval_prompts(per_pair, seed))]


_PARSE = re.compile(
    r"\b(?P<colour>" + "|".join(COLOURS) + r")\b|\b(?P<shape>" + "|".join(SHAPES) + r")\b|\b(?P<size>"
    + "|".join(SIZES) + r")\b"
)


def parse_prompt(prompt: str) -> dict[str, str]:
    """Attributes named in a prompt (colour, shape, size, position, background); missing ones absent."""
    text = prompt.lower()
    found: dict[str, str] = {}
    for m in _PARSE.finditer(text):
        for key, val in m.groupdict().items():
            if val and key not in found:
                found[key] = val
    bg = re.search(r"\b(" + "|".join(BACKGROUNDS) + r")\b(?= background|$)|on (?:a )?(" + "|".join(BACKGROUNDS)
                   + r")\b", text)
    if bg:
        found["background"] = bg.group(1) or bg.group(2)
    for name in sorted(POSITIONS, key=len, reverse=True):  # "top left" before "top"
        if re.search(r"\b" + name + r"\b", text):
            found["position"] = name
            break
    return found
