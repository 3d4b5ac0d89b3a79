"""The trainer's input: prepared shards through the DataLoader, in the same order whatever the worker count."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config
from pipeline.data.loader import open_training_data
from pipeline.errors import UserError
from pipeline.training.batches import batch_indices, batch_loader, random_flip


@pytest.fixture(scope="module")
def data(shapes_data, tmp_path_factory):
    from conftest import tiny_config

    cfg = Config.model_validate(tiny_config(tmp_path_factory.mktemp("ds"), shapes_data))
    return cfg, open_training_data(cfg.data, cfg.ingest)


def test_loader_follows_the_training_stream_with_any_worker_count(data):
    _, d = data
    n = len(d.images)
    start, bs = 37, 8
    for workers in (0, 2):
        it = batch_loader(d.images, seed=3, start=start, batch_size=bs, workers=workers, pin_memory=False)
        for k in range(5):
            idx, pixels, cond = next(it)
            assert cond is None  # a text-only run reads no condition images
            assert idx.tolist() == batch_indices(n, 3, start + k * bs, bs).tolist()
            ref = torch.from_numpy(d.dataset.images(d.images.rows[idx.numpy()])).permute(0, 3, 1, 2)
            assert torch.equal(pixels, ref) and pixels.dtype == torch.uint8


def test_random_flip_is_reproducible_and_mirrors_about_half(data):
    x = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).reshape(64, 3, 4, 4)
    a, b = random_flip(x, seed=0, position=128), random_flip(x, seed=0, position=128)
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert torch.equal(a[flipped], x[flipped].flip(-1)) and 16 < int(flipped.sum()) < 48
    assert not torch.equal(random_flip(x, seed=0, position=192), a)


def test_prepared_dataset_at_another_resolution_is_a_clear_error(data):
    cfg, d = data
    wrong = cfg.data.model_copy(update={"path": d.dataset.path, "resolution": 32})
    with pytest.raises(UserError, match="prepared at 16 px but data.resolution is 32"):
        open_training_data(wrong, cfg.ingest)
