"""Sampling: determinism, samplers, img2img limits, the diffusers model format."""

import torch

from pipeline.model.folder import load_model
from pipeline.model.sampling import generate

PROMPT = "a large red circle in the center on a white background"


def test_same_seed_same_images_whatever_the_batch(trained_tiny):
    model = load_model(trained_tiny)
    a = generate(model, [PROMPT, "a small blue square on the left on a black background"], [3, 4], steps=5)
    b = generate(model, [PROMPT, "a small blue square on the left on a black background"], [3, 4], steps=5)
    assert torch.equal(a, b)
    alone = generate(model, ["a small blue square on the left on a black background"], [4], steps=5)
    assert torch.equal(a[1:], alone)  # an image depends on its seed, not on its batch
    other = generate(model, [PROMPT], [5], steps=5)
    assert not torch.equal(a[:1], other)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 16, 16)


def test_all_samplers_run_and_empty_prompt_is_unconditional(trained_tiny):
    model = load_model(trained_tiny)
    for sampler, steps in (("dpmpp", 5), ("ddim", 5), ("ddpm", 20)):
        out = generate(model, [PROMPT, ""], [0, 0], sampler=sampler, steps=steps)
        assert out.shape == (2, 3, 16, 16)
    guided = generate(model, [PROMPT], [0], steps=5, guidance=6.0)
    unguided = generate(model, [PROMPT], [0], steps=5, guidance=1.0)
    assert not torch.equal(guided, unguided)


def test_img2img_strength_limits(trained_tiny):
    model = load_model(trained_tiny)
    g = torch.Generator().manual_seed(0)
    init_a = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    init_b = -init_a
    as_uint8 = ((init_a.clamp(-1, 1) + 1) * 127.5).round()
    kept = generate(model, [PROMPT], [1], steps=20, init_images=init_a, strength=0.0)
    assert torch.equal(kept.float(), as_uint8)
    low = generate(model, [PROMPT], [1], steps=20, init_images=init_a, strength=0.05)
    assert (low.float() - as_uint8).abs().mean() < 25  # one step of noise: still close to the init image
    fa = generate(model, [PROMPT], [1], steps=20, init_images=init_a, strength=1.0).float()
    fb = generate(model, [PROMPT], [1], steps=20, init_images=init_b, strength=1.0).float()
    txt = generate(model, [PROMPT], [1], steps=20).float()
    # at strength 1 the init image is ignored: two opposite init images give (nearly) the txt2img image
    assert (fa - fb).abs().max() <= 2 and (fa - txt).abs().max() <= 2
    mid_a = generate(model, [PROMPT], [1], steps=20, init_images=init_a, strength=0.5).float()
    mid_b = generate(model, [PROMPT], [1], steps=20, init_images=init_b, strength=0.5).float()
    assert (mid_a - mid_b).abs().mean() > 5  # in between, the init image shows


def test_unet_loads_with_diffusers_from_pretrained(trained_tiny):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(trained_tiny / "unet"))
    sched = DDPMScheduler.from_pretrained(str(trained_tiny / "scheduler"))
    assert sched.config.prediction_type == "v_prediction"
    ours = load_model(trained_tiny).unet
    for (k, a), (_, b) in zip(unet.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert (trained_tiny / "conditioning.json").is_file()
