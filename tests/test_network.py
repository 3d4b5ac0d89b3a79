"""Ways to attach context: cross-attention, additive, both, and category labels."""

import pytest
import torch

from pipeline.config import Config
from pipeline.model.encoders import ContextBatch
from pipeline.model.network import ModelSpec, build_unet, denoise
from tests.conftest import tiny_config


def _spec(attach, encoder="minilm", categories=None):
    return ModelSpec(resolution=16, patch_size=2, coord_channels=True, encoder=encoder, encoder_id="x",
                     max_length=8, categories=categories, attach=attach, context_dim=24,
                     prediction_type="v_prediction")


@pytest.mark.parametrize(("attach", "film"), [("cross_attention", False), ("additive", True), ("both", True)])
def test_context_changes_the_prediction(attach, film):
    spec = _spec(attach)
    unet = build_unet(spec, [32, 32], 1, [False, True], 8, 8, scale_shift=film).eval()
    assert unet.config.in_channels == 12 + 2  # 2x2 patches of RGB + x/y coordinates
    assert unet.config.resnet_time_scale_shift == ("scale_shift" if film else "default")
    has_attn = any("attn2" in n for n, _ in unet.named_modules())
    assert has_attn == (attach != "additive")
    assert (unet.class_embedding is not None) == (attach != "cross_attention")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([500, 500])
    ctx_a = ContextBatch(torch.randn(2, 8, 24, generator=g), torch.ones(2, 8, dtype=torch.long),
                         torch.randn(2, 24, generator=g))
    ctx_b = ContextBatch(torch.randn(2, 8, 24, generator=g), torch.ones(2, 8, dtype=torch.long),
                         torch.randn(2, 24, generator=g))
    with torch.no_grad():
        out_a, out_b = denoise(unet, spec, x, t, ctx_a), denoise(unet, spec, x, t, ctx_b)
    assert out_a.shape == x.shape
    assert not torch.allclose(out_a, out_b)


def test_category_conditioning_trains(tmp_path, shapes_data):
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import generate
    from pipeline.training.loop import train

    raw = tiny_config(tmp_path, shapes_data, data={"label_column": "colour"},
                      context={"encoder": "category", "attach": "cross_attention"}, train={"max_steps": 4})
    model_dir = train(Config.model_validate(raw), progress=False)
    model = load_model(model_dir)
    assert model.spec.categories == sorted({"red", "green", "blue", "yellow", "purple", "orange"})
    assert model.unet.class_embedding.num_embeddings == 7  # six colours + the null class
    images = generate(model, ["red", ""], [0, 0], steps=3)
    assert images.shape == (2, 3, 16, 16)


def test_gradient_checkpointing_saves_memory_not_the_result(tmp_path, shapes_data, embedding_cache):
    """train.gradient_checkpointing recomputes activations in the backward pass: on the CPU the trained weights are
    the same, bit for bit."""
    from safetensors.torch import load_file

    from pipeline.training.loop import train

    weights = []
    for checkpointing in (False, True):
        raw = tiny_config(tmp_path / str(checkpointing), shapes_data, context={"cache_dir": str(embedding_cache)},
                          train={"max_steps": 3, "gradient_checkpointing": checkpointing})
        model_dir = train(Config.model_validate(raw), progress=False)
        weights.append(load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors")))
    plain, checkpointed = weights
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert any(not torch.equal(plain[k], torch.zeros_like(plain[k])) for k in plain)


def test_unets_attend_through_pytorch_sdpa():
    """diffusers' default attention processor calls torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on a GPU): no slower processor is set anywhere."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = build_unet(_spec("both"), [32, 32], 1, [False, True], 8, 8)
    processors = set(map(type, unet.attn_processors.values()))
    assert processors == {AttnProcessor2_0}
