"""Aspect-ratio buckets (`ingest.buckets`): the bucket sizes, an ingest that keeps each image's aspect ratio (and
its condition image's), the prepared format's reads, the validation gate, a training stream whose every batch
is one bucket (reproducible, resumable, DDP-shared), and a tiny training run that resumes bit-identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pipeline.training.loop
from pipeline.config import BucketConfig, Config, IngestConfig, ValidationConfig
from pipeline.data.buckets import bucket_sizes, nearest_bucket
from pipeline.data.ingest import ingest
from pipeline.data.loader import ShardImages
from pipeline.data.prepared import open_prepared
from pipeline.errors import UserError
from pipeline.training.batches import batch_indices, batch_loader
from pipeline.training.checkpoints import checkpoint_dirs
from pipeline.training.distributed import Part
from pipeline.training.loop import train
from pipeline.training.objective import diffusion_loss
from tests.conftest import invoke, tiny_config

# (width, height) of the source images: wide, tall and square ones, at target side 32 with step 8 they land in
# 40x24, 24x40 and 32x32
SOURCE_SIZES = [(40, 24), (24, 40), (32, 32), (48, 30), (30, 48), (36, 36), (80, 48), (20, 34), (64, 64),
                (45, 26), (26, 45), (33, 31)]
WORDS = ["red", "green", "blue", "small", "large", "round", "square", "dark", "light", "striped", "dotted", "plain"]
BUCKETS_32 = BucketConfig(enabled=True, step=8)


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_source(root: Path, condition_files: bool = False) -> Path:
    """An imagefolder of noise images of SOURCE_SIZES; with `condition_files`, items 0 and 1 (wide and tall)
    name a square condition image, which must still get their buckets."""
    root.mkdir(parents=True)
    lines = []
    for i, (w, h) in enumerate(SOURCE_SIZES):
        Image.fromarray(noise(w, h, i)).save(root / f"img{i:02d}.png")
        line = {"file_name": f"img{i:02d}.png", "text": f"a {WORDS[i]} {WORDS[-1 - i]} thing number {i}"}
        if condition_files and i < 2:
            Image.fromarray(noise(32, 32, 100 + i)).save(root / f"cond{i}.png")
            line["conditioning_image"] = f"cond{i}.png"
        lines.append(json.dumps(line))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("buckets") / "src", condition_files=True)


@pytest.fixture(scope="module")
def bucketed(source) -> Path:
    """The source ingested at side 32 in buckets of step 8, with its condition files and doodles for the rest."""
    out = source.parent / "prepared" / "bucketed"
    ingest(str(source), out, 32, IngestConfig(workers=1, doodles=True, buckets=BUCKETS_32),
           condition_column="conditioning_image", progress=False)
    return out


# ---------------------------------------------------------------- bucket sizes


def test_bucket_sizes():
    assert bucket_sizes(512, BucketConfig(enabled=True)) == [(384, 640), (448, 576), (512, 512), (576, 448),
                                                             (640, 384)]
    assert bucket_sizes(32, BUCKETS_32) == [(24, 40), (32, 32), (40, 24)]
    wide = bucket_sizes(512, BucketConfig(step=32, max_aspect=4.0))
    assert (512, 512) in wide and all(w % 32 == 0 and h % 32 == 0 and w * h <= 512**2 for w, h in wide)
    assert max(max(w, h) / min(w, h) for w, h in wide) > 2 and max(max(b) for b in wide) <= 1024
    assert nearest_bucket(1000, 600, bucket_sizes(32, BUCKETS_32)) == (40, 24)
    assert nearest_bucket(600, 1000, bucket_sizes(32, BUCKETS_32)) == (24, 40)
    assert nearest_bucket(110, 100, bucket_sizes(32, BUCKETS_32)) == (32, 32)


def test_a_config_without_buckets_is_a_user_error(source, tmp_path):
    with pytest.raises(UserError, match=r"ingest.buckets.step \(64\) does not divide the resolution \(36\)"):
        bucket_sizes(36, BucketConfig(enabled=True))
    with pytest.raises(UserError, match=r"ingest.buckets.max_side \(24\) is below the resolution"):
        bucket_sizes(32, BucketConfig(enabled=True, step=8, max_side=24))
    result = invoke("data", "ingest", str(source), "--name", str(tmp_path / "nope"), "--resolution", "36",
                    "--buckets")
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert "ingest.buckets.step" in result.output
    assert not (tmp_path / "nope").exists() and not list(tmp_path.glob(".nope*"))


# ---------------------------------------------------------------- ingest and the prepared format


def test_ingest_keeps_the_aspect_ratio(source, bucketed):
    ds = open_prepared(bucketed)
    assert ds.is_bucketed and ds.resolution == 32
    assert ds.info["buckets"] == [[24, 40], [32, 32], [40, 24]]
    assert ds.info["items_per_bucket"] == {"24x40": 4, "32x32": 4, "40x24": 4}
    m = ds.manifest.reset_index(drop=True)
    row = {uri: i for i, uri in enumerate(m["source_uri"])}
    assert (m["width"].to_numpy() == ds.sizes[:, 1]).all() and (m["height"].to_numpy() == ds.sizes[:, 0]).all()
    # an image of exactly a bucket's size is kept as it is; a wider one is scaled and centre-cropped into it
    assert np.array_equal(ds.images([row["img00.png"]])[0], noise(40, 24, 0))
    assert tuple(ds.sizes[row["img06.png"]]) == (24, 40) and tuple(ds.sizes[row["img01.png"]]) == (40, 24)
    # condition images: the image's bucket, also for a condition file of another aspect ratio
    for size in ((24, 40), (40, 24), (32, 32)):
        rows = np.flatnonzero((ds.sizes == size).all(axis=1))
        assert ds.images(rows).shape == ds.conditions(rows).shape == (4, *size, 3)
    assert m.loc[row["img00.png"], "condition"] == "cond0.png" and m.loc[row["img02.png"], "condition"] == "doodle"
    # each shard holds one size; mixed rows are refused by images() and read by square_images / by_size
    shards = sorted((bucketed / "shards").glob("*.npy"))
    assert len(shards) == 3 and len({np.load(f, mmap_mode="r").shape[1:] for f in shards}) == 3
    with pytest.raises(ValueError, match="several sizes"):
        ds.images(np.arange(len(ds)))
    squares = ds.square_images(np.arange(len(ds)), 16)
    assert squares.shape == (12, 16, 16, 3)
    assert sorted(np.concatenate([at for at, _ in ds.by_size(np.arange(len(ds)))]).tolist()) == list(range(12))
    # the manifest keeps source order, the pixels sit at each row's (shard, index)
    assert m["source_uri"].tolist() == [f"img{i:02d}.png" for i in range(12)]


def test_bucketed_ingest_is_deterministic_and_the_cli_shows_the_buckets(source, bucketed, tmp_path):
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("ingest:\n  workers: 1\n  doodles: true\n  buckets: {step: 8}\n")
    result = invoke("data", "ingest", str(source), "--name", str(tmp_path / "again"), "--resolution", "32",
                    "--config", str(cfg), "--condition-column", "conditioning_image", "--buckets")
    assert result.exit_code == 0, result.output
    assert "bucket 40x24" in result.output and "bucket 24x40" in result.output
    files = sorted(p.relative_to(bucketed) for p in bucketed.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:
        if f.name != "dataset.json":  # it names the output folder
            assert (bucketed / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    assert json.loads((tmp_path / "again" / "dataset.json").read_text())["version"] == open_prepared(bucketed).version


def test_square_stays_the_default(source, tmp_path):
    a = ingest(str(source), tmp_path / "a", 32, IngestConfig(workers=1), progress=False)
    b = ingest(str(source), tmp_path / "b", 32, IngestConfig(workers=1, buckets={"step": 8}), progress=False)
    assert a["version"] == b["version"] and "buckets" not in a and "buckets" not in a["ingest"]
    ds = open_prepared(tmp_path / "a")
    assert not ds.is_bucketed and "width" not in ds.manifest.columns
    assert ds.images(np.arange(len(ds))).shape == (12, 32, 32, 3) and (ds.sizes == 32).all()
    assert np.array_equal(ds.square_images([3, 1], 32), ds.images([3, 1]))
    assert ShardImages(ds, np.arange(len(ds))).bucket_groups() is None
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("ingest:\n  workers: 1\n  buckets: {enabled: true, step: 8}\n")
    result = invoke("data", "ingest", str(source), "--name", str(tmp_path / "c"), "--resolution", "32",
                    "--config", str(cfg), "--no-buckets")
    assert result.exit_code == 0 and "bucket " not in result.output, result.output
    assert json.loads((tmp_path / "c" / "dataset.json").read_text())["version"] == a["version"]


def test_validation_accepts_a_bucketed_dataset_and_catches_a_wrong_shard(bucketed, tmp_path):
    from pipeline.data.validation import validate_dataset

    def failed(path: Path) -> set[str]:
        result = validate_dataset(path, ValidationConfig(resolution=32))
        return {c.name for c in result.checks if not c.success and c.severity == "hard"}

    good = Path(shutil.copytree(bucketed, tmp_path / "good"))
    assert failed(good) == set()
    # a shard whose images are of another bucket than its manifest rows say
    swapped = Path(shutil.copytree(bucketed, tmp_path / "swapped"))
    shard = next(f for f in sorted((swapped / "shards").glob("*.npy")) if np.load(f).shape[1:3] == (24, 40))
    for folder in ("shards", "conditions"):  # condition shards must match their image shards
        f = swapped / folder / shard.name
        np.save(f, np.load(f).transpose(0, 2, 1, 3).copy())
    assert failed(swapped) == {"shards_match_manifest"}
    # a size that is no bucket of the dataset
    odd = Path(shutil.copytree(bucketed, tmp_path / "odd"))
    for folder in ("shards", "conditions"):
        f = odd / folder / shard.name
        np.save(f, np.load(f)[:, :, :32])
    assert failed(odd) == {"image_shape", "shards_match_manifest"}
    # a pixel budget the buckets exceed
    small = validate_dataset(good, ValidationConfig(resolution=24))
    assert {c.name for c in small.hard_failures} == {"resolution", "image_shape"}


def test_report_and_evaluation_read_a_bucketed_dataset(bucketed, tmp_path):
    from pipeline.config import EvaluationConfig
    from pipeline.data.report import contact_sheet
    from pipeline.evaluation.metrics import copy_rate
    from pipeline.evaluation.protocol import load_eval_data

    ds = open_prepared(bucketed)
    sheet = Image.open(contact_sheet(ds, tmp_path / "sheet.png", 12))
    assert sheet.size == (4 * 32, 3 * 32)
    data = load_eval_data(bucketed, 32, EvaluationConfig())
    assert data.heldout_images.shape[1:] == (32, 32, 3)
    copies = torch.from_numpy(ds.square_images(np.arange(4), 32)).permute(0, 3, 1, 2)
    assert copy_rate(copies, ds, np.arange(len(ds)), 32, 16, 0.02)["copy_rate"] == 1.0


# ---------------------------------------------------------------- the training stream


class Buckets(torch.utils.data.Dataset):
    """Items of the given buckets, reading nothing: a batch is its indices."""

    def __init__(self, bucket_of: list[int]):
        self.bucket_of = np.asarray(bucket_of)

    def __len__(self) -> int:
        return len(self.bucket_of)

    def bucket_groups(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.bucket_of == b) for b in np.unique(self.bucket_of)]

    def __getitems__(self, idx: list[int]):
        return torch.as_tensor(idx), None, None


def stream(data, seed: int = 0, start: int = 0, size: int = 4, count: int = 12, part: Part = Part()) -> list:
    batches = batch_loader(data, seed, start, size, workers=0, pin_memory=False, part=part)
    return [next(batches)[0].tolist() for _ in range(count)]


def test_every_batch_is_one_bucket_and_every_item_is_seen_each_epoch():
    data = Buckets([0] * 7 + [1] * 3 + [2])  # 2 + 1 + 1 batches of 4 an epoch; bucket 2 is one item
    batches = stream(data, count=12)
    for batch in batches:
        assert len(batch) == 4 and len({int(data.bucket_of[i]) for i in batch}) == 1
    for epoch in range(3):
        assert set().union(*batches[4 * epoch : 4 * epoch + 4]) == set(range(11))
    assert batches[:4] != batches[4:8]  # a fresh order every epoch
    assert stream(data, count=12) == batches and stream(data, seed=1, count=12) != batches
    # resume: the stream from a middle position is the tail of the whole stream
    assert stream(data, start=5 * 4, count=7) == batches[5:]
    # DDP: the two ranks' shares of each global batch make up the single-process batch
    ranks = [stream(data, count=12, part=Part(rank, 2)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == batches


def test_square_data_keeps_the_plain_stream():
    class Square(Buckets):
        def bucket_groups(self):
            return None

    data = Square([0] * 10)
    assert stream(data, start=8, size=4, count=3) == [batch_indices(10, 0, 8 + 4 * k, 4).tolist() for k in range(3)]


def test_shard_images_batches_are_one_size(bucketed):
    ds = open_prepared(bucketed)
    images = ShardImages(ds, np.arange(len(ds)), conditions=True)
    groups = images.bucket_groups()
    assert [len(g) for g in groups] == [4, 4, 4]
    batches = batch_loader(images, 0, 0, 3, workers=0, pin_memory=False)
    for _ in range(6):
        idx, pixels, cond = next(batches)
        assert pixels.shape == cond.shape and pixels.shape[:2] == (3, 3)
        assert all(tuple(ds.sizes[i]) == tuple(pixels.shape[2:]) for i in idx.tolist())


# ---------------------------------------------------------------- training


def test_training_on_buckets_finishes_and_resumes_bit_identical(tmp_path, embedding_cache, monkeypatch):
    src = make_source(tmp_path / "src")
    shapes = []  # (height, width) of every batch the UNet trained on

    def recording_loss(*args, **kwargs):
        x0, cond = args[3], args[-1]
        assert cond.shape == x0.shape
        shapes.append(tuple(x0.shape[-2:]))
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(pipeline.training.loop, "diffusion_loss", recording_loss)

    def config(name: str, model: dict | None = None, cycles: list | None = None) -> Config:
        raw = tiny_config(tmp_path / name, src, ingest={"doodles": True, "buckets": {"enabled": True, "step": 4}},
                          data={"prepared_cache": str(tmp_path / "prepared"), "random_flip": True},
                          context={"cache_dir": str(embedding_cache), "image_condition": True},
                          train={"batch_size": 4, "max_steps": 4, "checkpoint_every": 2, "log_every": 1})
        raw["model"] |= model or {}
        if cycles:
            raw["train"] = {k: v for k, v in raw["train"].items() if k != "max_steps"} | {"cycles": cycles}
        return Config.model_validate(raw)

    full = Path(train(config("full"), progress=False)).parent
    ds = open_prepared(next((tmp_path / "prepared").iterdir()))
    assert ds.info["buckets"] == [[12, 20], [16, 16], [20, 12]]
    assert len(shapes) == 4 and set(shapes) == {(20, 12), (16, 16), (12, 20)}

    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(checkpoint_dirs(resumed)[-1])
    assert [d.name for d in checkpoint_dirs(resumed)] == ["step-0000002"]
    train(config("resumed"), resume=True, progress=False)
    a = load_file(str(full / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # bucket sides the UNet cannot take, and a cycle at a lower side, are clear errors before training
    with pytest.raises(UserError, match=r"images of 20x12, 12x20 px do not fit the model.* ingest.buckets.step a "
                                        r"multiple of 8"):
        train(config("coarse", model={"patch_size": 4}), progress=False)  # multiples of 8; the buckets: of 4
    with pytest.raises(UserError, match=r"train.cycles\[0\].resolution: cycles at another resolution need square"):
        train(config("cycles", cycles=[{"steps": 2, "resolution": 8}, {"steps": 2}]), progress=False)
