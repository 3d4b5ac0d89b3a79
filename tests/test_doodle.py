"""The built-in doodle transform (outline sketches of training images), loading a user's sketch at the model
resolution, the outline measure (filled mask, IoU), and `diffuse data doodle`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.data.doodle import doodle_from_image, edge_map, filled_mask, ink, iou, load_doodle
from pipeline.shapes import dataset as shapes
from pipeline.shapes import scorer

CASES = [shapes.ShapeSpec(colour, shape, size, position, background)
         for shape in shapes.SHAPES
         for colour, size, position, background in (("yellow", "large", "center", "white"),
                                                    ("blue", "small", "bottom right", "gray"),
                                                    ("red", "large", "top left", "black"))]  # cut by the frame


def outline_distance(mask: np.ndarray) -> np.ndarray:
    """Per pixel: distance (px) to the nearest pixel of the mask's outline."""
    outline = mask ^ ndimage.binary_erosion(mask)
    return ndimage.distance_transform_edt(~outline)


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.shape}-{s.position}")
def test_doodle_traces_the_shape_outline(spec):
    image = shapes.render(spec, 64, (0.02, -0.02))
    obj = scorer.object_mask(image)
    doodle = doodle_from_image(np.asarray(image), seed=5)
    assert doodle.shape == (64, 64, 3) and doodle.dtype == np.uint8
    assert set(np.unique(doodle)) == {0, 255}  # black lines on white paper
    lines = ink(doodle)
    dist = outline_distance(obj)
    assert dist[lines].max() <= 3  # lines only along the outline (jitter: 0.02 * 64 = 1.3 px)
    # ...and along all of it: no breaks, a closed outline even where the frame cuts the shape
    near_line = ndimage.distance_transform_edt(~lines)
    assert (near_line[dist == 0] <= 1.5).mean() > 0.98
    assert iou(filled_mask(doodle), obj) > 0.6


def test_doodle_outline_at_the_training_resolution():
    for spec in CASES:
        image = shapes.render(spec, 32)
        assert iou(filled_mask(doodle_from_image(np.asarray(image), seed=0)), scorer.object_mask(image)) > 0.6, spec


def test_doodle_is_deterministic_per_seed_and_jitter_moves_lines():
    rgb = np.asarray(shapes.render(shapes.ShapeSpec("green", "circle", "large", "center", "white"), 64))
    a, b = doodle_from_image(rgb, seed=1), doodle_from_image(rgb, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, doodle_from_image(rgb, seed=2))
    still = doodle_from_image(rgb, seed=1, jitter=0.0)
    assert np.array_equal(still, doodle_from_image(rgb, seed=2, jitter=0.0))  # no jitter: nothing random left
    assert np.array_equal(ink(still), edge_map(rgb))  # the exact edges at 64 px (line width 2: no dilation)
    wobbly = ink(doodle_from_image(rgb, seed=1, jitter=0.06))
    moved = (wobbly & ~ink(still)).sum() / wobbly.sum()
    assert moved > 0.2
    assert ndimage.distance_transform_edt(~ink(still))[wobbly].max() <= 0.06 * 64 + 1


def test_thickness_widens_lines():
    rgb = np.asarray(shapes.render(shapes.ShapeSpec("red", "square", "large", "center", "white"), 128))
    default = ink(doodle_from_image(rgb, seed=0, jitter=0.0)).sum()  # 128 // 32 = 4 px
    thin = ink(doodle_from_image(rgb, seed=0, jitter=0.0, thickness=1)).sum()
    thick = ink(doodle_from_image(rgb, seed=0, jitter=0.0, thickness=8)).sum()
    assert thin < default < thick and 3.0 < thick / thin < 5.0


def test_flat_or_faintly_noisy_image_gives_a_blank_page():
    assert (doodle_from_image(np.full((32, 32, 3), 90, np.uint8), seed=0) == 255).all()
    noise = np.random.default_rng(0).integers(120, 124, (32, 32, 3)).astype(np.uint8)
    assert (doodle_from_image(noise, seed=0) == 255).all()
    assert not filled_mask(np.full((8, 8, 3), 255, np.uint8)).any()


def test_filled_mask_and_iou():
    page = Image.new("RGB", (20, 20), "white")
    ImageDraw.Draw(page).rectangle((4, 4, 13, 13), outline="black")  # a 10x10 box of 1 px lines
    filled = filled_mask(np.asarray(page))
    assert filled.sum() == 100 and filled[8, 8] and not filled[2, 2]
    other = np.zeros((20, 20), bool)
    other[4:14, 9:19] = True  # half of it overlaps
    assert iou(filled, other) == pytest.approx(50 / 150)
    assert iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0


def _sketch_512() -> Image.Image:
    page = Image.new("L", (512, 512), 255)
    draw = ImageDraw.Draw(page)
    draw.line((40, 200, 470, 200), fill=0, width=1)  # a 1 px pen stroke
    draw.line((300, 30, 300, 480), fill=0, width=1)
    return page


def test_load_doodle_keeps_a_thin_line_visible_when_downscaling():
    small = load_doodle(_sketch_512(), 32)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    lines = ink(small)
    assert lines[12:14, 4:28].any(0).all()  # y 200 / 16 = 12.5: the horizontal stroke, unbroken
    assert lines[4:28, 18:20].any(1).all()  # x 300 / 16 = 18.75: the vertical one
    assert lines.sum() < 32 * 5  # strokes, not smudges
    # what the thickening prevents: a plain box downscale fades the stroke to near white
    plain = np.asarray(_sketch_512().convert("RGB").resize((32, 32), Image.Resampling.BOX))
    assert not ink(plain).any()


def test_load_doodle_crops_converts_and_upscales():
    wide = Image.new("LA", (600, 300), (0, 0))  # transparent canvas: composited on white
    ImageDraw.Draw(wide).rectangle((150, 0, 449, 299), outline=(0, 255), width=2)  # a square in the middle
    square = load_doodle(wide, 30)
    assert square.shape == (30, 30, 3)
    lines = ink(square)
    assert lines[:, 0].all() and lines[:, -1].all() and not lines[10:20, 10:20].any()  # centre crop = the square
    tiny = Image.new("RGB", (16, 16), "white")
    tiny.putpixel((8, 8), (0, 0, 0))
    assert load_doodle(tiny, 64).shape == (64, 64, 3)
    assert np.array_equal(load_doodle(tiny, 16), np.asarray(tiny))


def test_cli_doodle_writes_a_png_and_refuses_bad_input(tmp_path):
    from conftest import invoke

    photo = tmp_path / "photo.jpg"
    shapes.render(shapes.ShapeSpec("purple", "triangle", "large", "center", "gray"), 96).save(photo, quality=95)
    out = tmp_path / "out" / "sketch.png"
    result = invoke("data", "doodle", str(photo), str(out), "--resolution", "48", "--seed", "3")
    assert result.exit_code == 0, result.output
    sketch = np.asarray(Image.open(out))
    assert sketch.shape == (48, 48, 3) and ink(sketch).any() and (sketch == 255).mean() > 0.7
    missing = invoke("data", "doodle", str(tmp_path / "nope.png"), str(out))
    assert missing.exit_code == 2 and "not found" in missing.output and "nope.png" in missing.output
    (tmp_path / "text.png").write_text("not an image")
    bad = invoke("data", "doodle", str(tmp_path / "text.png"), str(out))
    assert bad.exit_code == 2 and "not a readable image" in bad.output
