"""Image (doodle) context: channel extension of a text-only model, condition dropout, text + image guidance."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import invoke, tiny_config
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.model.folder import load_model, save_model
from pipeline.model.network import denoise, extend_condition_channels
from pipeline.model.sampling import encode_prompts, generate
from pipeline.shapes import dataset as shapes
from pipeline.shapes.protocol import evaluate_doodles, score_doodles
from pipeline.training.loop import train
from pipeline.training.objective import cfg_dropout, image_dropout

PROMPT = "a small red circle in the center on a white background"


def _doodle(res: int = 16) -> torch.Tensor:
    """A white canvas with a black square outline, in [-1, 1]."""
    img = torch.ones(3, res, res)
    img[:, 4:12, 4] = img[:, 4:12, 11] = img[:, 4, 4:12] = img[:, 11, 4:12] = -1.0
    return img


def test_extension_adds_zero_channels_and_keeps_the_model_as_it_was(trained_tiny, tmp_path):
    model = load_model(trained_tiny)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([900, 300])
    ctx = encode_prompts(model.spec, [PROMPT, ""])
    with torch.no_grad():
        before = denoise(model.unet, model.spec, x, t, ctx)
    old_in = model.unet.conv_in.in_channels
    unet, spec = extend_condition_channels(model.unet, model.spec, 3)
    assert spec.condition_channels == 3 and model.spec.condition_channels == 0
    assert unet.conv_in.in_channels == unet.config.in_channels == old_in + 3 * 2 * 2  # 2x2 patches of RGB
    assert torch.count_nonzero(unet.conv_in.weight[:, old_in:]) == 0
    with torch.no_grad():
        after = denoise(unet, spec, x, t, ctx, cond=_doodle().expand(2, -1, -1, -1))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # zero weights: the doodle changes nothing yet

    # the extended model is a plain diffusers UNet with more input channels

    saved = save_model(tmp_path / "model", unet, DDPMScheduler.from_config(model.scheduler_config), spec)
    assert UNet2DConditionModel.from_pretrained(saved / "unet").config.in_channels == old_in + 12
    assert load_model(saved).spec.condition_channels == 3
    with pytest.raises(ValueError, match="already takes 3"):
        extend_condition_channels(unet, spec, 1)


def test_condition_dropout_has_its_own_rate_independent_of_the_caption_dropout():
    g = torch.Generator().manual_seed(0)
    n = 20000
    cond = torch.ones(n, 3, 2, 2)
    present = torch.ones(n, dtype=torch.bool)
    rows = cfg_dropout(torch.ones(n, dtype=torch.long), 0.1, 0, g)
    kept = image_dropout(cond, present, 0.3, g)
    text_dropped, image_dropped = rows == 0, (kept == 0).flatten(1).all(1)
    assert abs(image_dropped.float().mean().item() - 0.3) < 0.015
    assert abs(text_dropped.float().mean().item() - 0.1) < 0.01
    assert abs((text_dropped & image_dropped).float().mean().item() - 0.03) < 0.006  # independent: 0.1 * 0.3
    assert torch.equal(kept[~image_dropped], cond[~image_dropped])
    again = image_dropout(cond, present, 0.3, g)  # the next step drops other samples
    assert not torch.equal(again, kept)
    absent = image_dropout(cond, torch.zeros(n, dtype=torch.bool), 0.0, g)  # no condition image: always null
    assert torch.count_nonzero(absent) == 0


def test_text_dropped_by_zero_text_guidance_equals_the_empty_prompt(doodle_model):
    d = _doodle().unsqueeze(0)
    kw = dict(steps=4, cond_images=d, image_guidance=2.0)
    no_text = generate(doodle_model, [PROMPT], [3], guidance=0.0, **kw)
    empty_prompt = generate(doodle_model, [""], [3], guidance=1.0, **kw)
    assert (no_text.int() - empty_prompt.int()).abs().max() <= 1
    with_text = generate(doodle_model, [PROMPT], [3], guidance=4.0, **kw)
    assert (with_text.int() - no_text.int()).abs().max() > 10


def test_image_dropped_equals_the_null_condition_and_image_guidance_weighs_the_doodle(doodle_model):
    d = _doodle().unsqueeze(0)
    no_doodle = generate(doodle_model, [PROMPT], [5], steps=4)
    null_doodle = generate(doodle_model, [PROMPT], [5], steps=4, cond_images=torch.zeros_like(d))
    assert (no_doodle.int() - null_doodle.int()).abs().max() <= 1  # what training's image dropout feeds
    plain = generate(doodle_model, [PROMPT], [5], steps=4, cond_images=d, image_guidance=1.0)
    strong = generate(doodle_model, [PROMPT], [5], steps=4, cond_images=d, image_guidance=3.0)
    assert (plain.int() - no_doodle.int()).abs().max() > 10
    assert (strong.int() - plain.int()).abs().max() > 10


def test_a_doodle_for_a_text_only_model_is_a_clear_error(trained_tiny, tmp_path):
    with pytest.raises(UserError, match="trained without a condition image"):
        generate(load_model(trained_tiny), [PROMPT], [0], steps=2, cond_images=_doodle().unsqueeze(0))
    with pytest.raises(UserError, match="image guidance must be between 0 and 50"):
        generate(load_model(trained_tiny), [PROMPT], [0], steps=2, image_guidance=-1)

    sketch = tmp_path / "sketch.png"
    Image.new("RGB", (64, 64), "white").save(sketch)
    r = invoke("sample", "--model", str(trained_tiny), "--prompt", PROMPT, "--doodle", str(sketch), "--num", "1",
               "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "trained without a condition image" in r.output


def test_sample_cli_follows_a_doodle_file(doodle_model, tmp_path):
    sketch = tmp_path / "sketch.png"
    arr = ((_doodle().permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    Image.fromarray(arr).resize((128, 128), Image.Resampling.NEAREST).save(sketch)  # any size: brought to 16 px
    r = invoke("sample", "--model", str(doodle_model.path), "--prompt", PROMPT, "--doodle", str(sketch),
               "--num", "2", "--steps", "3", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out").glob("*seed*.png"))) == 2
    missing = invoke("sample", "--model", str(doodle_model.path), "--prompt", PROMPT, "--doodle",
                     str(tmp_path / "nope.png"), "--out", str(tmp_path / "out2"))
    assert missing.exit_code == 2 and "doodle not found" in missing.output


@pytest.fixture(scope="module")
def doodle_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("doodle_shapes") / "data"
    shapes.make_dataset(out, 48, resolution=16, seed=0, doodles=True)
    return out


def test_training_extends_a_text_only_checkpoint_with_the_doodle(trained_tiny, doodle_data, tmp_path):
    text_model = load_model(trained_tiny)
    raw = tiny_config(tmp_path, doodle_data, data={"condition_column": "conditioning_image"},
                      context={"image_condition": True, "image_dropout": 0.2},
                      train={"max_steps": 4, "init_from": str(trained_tiny), "checkpoint_every": 4})
    model = load_model(train(Config.model_validate(raw), progress=False))
    assert model.spec.condition_channels == 3
    assert model.spec.context_stats == text_model.spec.context_stats  # the context scaled as the weights learned
    # training moved the new channels away from zero
    assert torch.count_nonzero(model.unet.conv_in.weight[:, -12:]) > 0
    assert generate(model, [PROMPT], [0], steps=2, cond_images=_doodle().unsqueeze(0)).shape == (1, 3, 16, 16)


def test_init_from_a_different_architecture_or_data_without_conditions_is_a_clear_error(
        trained_tiny, doodle_data, shapes_data, tmp_path):
    wider = tiny_config(tmp_path / "a", doodle_data, data={"condition_column": "conditioning_image"},
                        context={"image_condition": True}, model={"block_out_channels": [32, 64]},
                        train={"max_steps": 2, "init_from": str(trained_tiny)})
    with pytest.raises(UserError, match=r"does not match this config.*block_out_channels"):
        train(Config.model_validate(wider), progress=False)
    no_doodles = tiny_config(tmp_path / "b", shapes_data, context={"image_condition": True},
                             train={"max_steps": 2})
    with pytest.raises(UserError, match="has no condition images"):
        train(Config.model_validate(no_doodles), progress=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_doodle_scoring_measures_how_well_images_follow_their_doodles():
    """The scorer on known images: the images the doodles were drawn from follow them (IoU = the reference, colour and
    shape right), blank images follow nothing, and images swapped between items score lower."""
    items = shapes.doodle_eval_items(per_pair=1, resolution=16)
    sources = torch.stack([torch.from_numpy(np.array(shapes.render(spec, 16))).permute(2, 0, 1)
                           for spec, _, _ in items])
    faithful = score_doodles(items, sources, 16)["all"]
    assert faithful["n"] == 18 and faithful["iou"] == faithful["iou_of_source_image"] > 0.5
    assert faithful["colour"] == 1.0 and faithful["shape"] > 0.9
    blank = score_doodles(items, torch.full_like(sources, 255), 16)["all"]
    assert blank["iou"] == 0.0 and blank["iou>=0.5"] == 0.0 and blank["colour"] == 0.0
    swapped = score_doodles(items, sources.roll(1, dims=0), 16)["all"]  # each image follows another's doodle
    assert swapped["iou"] < faithful["iou"] - 0.1


def test_doodle_evaluation_runs_the_protocol_with_and_without_the_doodles(doodle_model):
    with_doodle = evaluate_doodles(doodle_model, per_pair=1, steps=2)
    assert with_doodle["summary"]["all"]["n"] == 18 and with_doodle["summary"]["held_out"]["n"] == 3
    assert with_doodle["protocol"]["image_guidance"] == 1.5 and with_doodle["protocol"]["use_doodle"]
    without = evaluate_doodles(doodle_model, per_pair=1, steps=2, use_doodle=False)
    assert without["protocol"]["image_guidance"] is None
    # the tiny model draws differently when it follows the doodles: the scores are of the images it made
    assert with_doodle["summary"] != without["summary"]
