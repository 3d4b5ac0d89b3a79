"""Ways to attach context: cross-attention, additive, both, and category labels."""

import pytest
import torch

from pipeline.config import Config
from pipeline.encoders import ContextBatch
from pipeline.network import ModelSpec, build_unet, denoise
from tests.conftest import tiny_config


def _spec(attach, encoder="minilm", categories=None, coord_frequencies=0):
    return ModelSpec(resolution=16, patch_size=2, coord_channels=True, coord_frequencies=coord_frequencies,
                     encoder=encoder, encoder_id="x",
                     max_length=8, categories=categories, attach=attach, context_dim=24,
                     prediction_type="v_prediction")


@pytest.mark.parametrize(("attach", "film", "freqs"),
                         [("cross_attention", False, 0), ("additive", True, 0), ("both", True, 2)])
def test_context_changes_the_prediction(attach, film, freqs):
    spec = _spec(attach, coord_frequencies=freqs)
    unet = build_unet(spec, [32, 32], 1, [False, True], 8, 8, scale_shift=film).eval()
    assert unet.config.in_channels == 12 + 2 + 4 * freqs
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
    from pipeline.model_dir import load_model
    from pipeline.sample import generate
    from pipeline.train import train

    raw = tiny_config(tmp_path, shapes_data, data={"label_column": "colour"},
                      context={"encoder": "category", "attach": "cross_attention"}, train={"max_steps": 4})
    model_dir = train(Config.model_validate(raw), progress=False)
    model = load_model(model_dir)
    assert model.spec.categories == sorted({"red", "green", "blue", "yellow", "purple", "orange"})
    assert model.unet.class_embedding.num_embeddings == 7  # six colours + the null class
    images = generate(model, ["red", ""], [0, 0], steps=3)
    assert images.shape == (2, 3, 16, 16)
