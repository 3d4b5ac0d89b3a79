"""Demo data and the analytic scorer."""

import json
import random

from PIL import Image

from pipeline import shapes


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
    right = shapes.score(items)["summary"]
    assert right["all"]["all"] >= 0.99, right
    assert right["held_out"]["n"] > 0 and right["held_out"]["colour+shape"] >= 0.99
    shuffled = [img for img, _ in items]
    rng.shuffle(shuffled)
    wrong = shapes.score(zip(shuffled, [p for _, p in items], strict=True))["summary"]["all"]
    assert wrong["colour+shape"] < 0.2 and wrong["position"] < 0.25 and wrong["all"] < 0.05


def test_scorer_finds_nothing_in_a_blank_image():
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    report = shapes.score([(blank, "a large red circle in the center on a white background")])
    assert report["summary"]["all"]["colour"] == 0 and report["items"][0]["found"] == {}


def test_eval_prompts_cover_every_pair():
    items = shapes.eval_prompts(4)
    pairs = {(s.colour, s.shape) for s, _ in items}
    assert len(items) == 72 and len(pairs) == 18 and shapes.HELD_OUT_PAIRS <= pairs
