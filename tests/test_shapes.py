"""Demo data and the analytic scorer."""

import json
import random

from PIL import Image

from pipeline.shapes import dataset as shapes
from pipeline.shapes import scorer


def test_dataset_is_deterministic_and_excludes_held_out_pairs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shapes.make_dataset(a, 200, resolution=32, seed=3)
    shapes.make_dataset(b, 200, resolution=32, seed=3)
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert (a / "000123.png").read_bytes() == (b / "000123.png").read_bytes()
    recs = [json.loads(x) for x in (a / "metadata.jsonl").read_text().splitlines()]
    assert not any((r["colour"], r["shape"]) in shapes.HELD_OUT_PAIRS for r in recs)
    assert len({r["text"] for r in recs}) > 150  # several phrasings, many combinations
    assert {r["position"] for r in recs} == set(shapes.POSITIONS)
    assert {r["background"] for r in recs} == set(shapes.BACKGROUNDS)


def test_parse_prompt_reads_every_phrasing():
    spec = shapes.ShapeSpec("purple", "triangle", "small", "top left", "gray")
    for template in range(4):
        got = shapes.parse_prompt(shapes.caption(spec, template))
        assert got == {"colour": "purple", "shape": "triangle", "size": "small", "position": "top left",
                       "background": "gray"}, template
    assert shapes.parse_prompt("a blue square at the top")["position"] == "top"


def test_scorer_scores_real_images_perfectly_and_mismatches_low():
    rng = random.Random(0)
    specs = shapes.all_specs()
    items = []
    for spec in rng.sample(specs, 300):
        jitter = (rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025))
        items.append((shapes.render(spec, 32, jitter), shapes.caption(spec, rng.randrange(4))))
    right = scorer.score(items)["summary"]
    assert right["all"]["all"] >= 0.99, right
    assert right["held_out"]["n"] > 0 and right["held_out"]["colour+shape"] >= 0.99
    shuffled = [img for img, _ in items]
    rng.shuffle(shuffled)
    wrong = scorer.score(zip(shuffled, [p for _, p in items], strict=True))["summary"]["all"]
    assert wrong["colour+shape"] < 0.2 and wrong["position"] < 0.25 and wrong["all"] < 0.05


def test_scorer_finds_nothing_in_a_blank_image():
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    report = scorer.score([(blank, "a large red circle in the center on a white background")])
    assert report["summary"]["all"]["colour"] == 0 and report["items"][0]["found"] == {}


def test_eval_prompts_cover_every_pair():
    items = shapes.eval_prompts(4)
    pairs = {(s.colour, s.shape) for s, _ in items}
    assert len(items) == 72 and len(pairs) == 18 and shapes.HELD_OUT_PAIRS <= pairs


def test_object_mask_is_the_shape():
    import numpy as np

    square = shapes.render(shapes.ShapeSpec("orange", "square", "large", "center", "gray"), 32)
    mask = scorer.object_mask(square)
    assert mask.shape == (32, 32) and mask.dtype == bool
    assert abs(int(mask.sum()) - 16 * 16) <= 16  # a 16 px square, give or take its anti-aliased rim
    assert mask[16, 16] and not mask[2, 2]
    assert not scorer.object_mask(Image.new("RGB", (32, 32), (128, 128, 128))).any()
    triangle = shapes.render(shapes.ShapeSpec("blue", "triangle", "small", "top left", "white"), 32)
    tri = scorer.object_mask(triangle)
    assert tri[:16, :16].sum() > 0.9 * tri.sum()  # where it was drawn
    assert np.array_equal(scorer.object_mask(triangle.transpose(Image.Transpose.ROTATE_90)), np.rot90(tri))


def test_shapes_cli_writes_doodles_named_in_metadata(tmp_path):
    import numpy as np
    from conftest import invoke

    from pipeline.data.doodle import doodle_from_image

    result = invoke("data", "shapes", "--out", str(tmp_path / "d"), "--num", "5", "--resolution", "32", "--doodles")
    assert result.exit_code == 0, result.output
    recs = [json.loads(x) for x in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert [r["conditioning_image"] for r in recs] == [f"doodles/{i:06d}.png" for i in range(5)]
    for i, r in enumerate(recs):
        image = np.asarray(Image.open(tmp_path / "d" / r["file_name"]))
        doodle = np.asarray(Image.open(tmp_path / "d" / r["conditioning_image"]))
        assert np.array_equal(doodle, doodle_from_image(image, seed=i))
        assert (doodle == 0).any()
    shapes.make_dataset(tmp_path / "plain", 5, resolution=32)
    assert "conditioning_image" not in (tmp_path / "plain" / "metadata.jsonl").read_text()
    assert not (tmp_path / "plain" / "doodles").exists()


def test_doodle_eval_items_outline_every_pair():
    from pipeline.data.doodle import filled_mask, iou

    items = shapes.doodle_eval_items(4, resolution=32)
    assert [(s, p) for s, p, _ in items] == shapes.eval_prompts(4, 4321)
    assert shapes.HELD_OUT_PAIRS <= {(s.colour, s.shape) for s, _, _ in items}
    overlap = []
    for spec, _, doodle in items:
        assert doodle.shape == (32, 32, 3)
        overlap.append(iou(filled_mask(doodle), scorer.object_mask(shapes.render(spec, 32))))
    # the ceiling a perfect generation reaches: the filled doodle also holds the outer half of its ~2 px line,
    # a large share of a small shape at 32 px
    assert min(overlap) > 0.55 and sum(overlap) / len(overlap) > 0.7
