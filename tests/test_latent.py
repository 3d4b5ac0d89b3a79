"""Latent models: `diffuse train-vae` (a diffusers AutoencoderKL), the latent cache (encoded once, exactly what
changed re-encoded, resumable, split across ranks), and a latent model trained, resumed, sampled (txt2img, other
sizes, img2img, doodle), evaluated, served by the pyfunc and batch-generated. Tiny VAEs and UNets from config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import Config
from pipeline.data.ingest import ingest
from pipeline.data.loader import open_training_data
from pipeline.data.prepared import open_prepared
from pipeline.errors import UserError
from pipeline.evaluation.protocol import evaluate
from pipeline.model.folder import load_model
from pipeline.model.sampling import generate
from pipeline.model.vae import load_vae, vae_spec
from pipeline.training.checkpoints import checkpoint_dirs
from pipeline.training.latents import cache_root, ensure_latents
from pipeline.training.loop import train
from pipeline.training.vae_loop import train_vae
from tests.conftest import ROOT, invoke, tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores

VAE = {"block_out_channels": [8, 16], "norm_num_groups": 4, "latent_channels": 4, "batch_size": 8, "max_steps": 6,
       "warmup_steps": 1, "log_every": 2, "checkpoint_every": 3, "sample_every": 3, "num_threads": 1}
LATENT_MODEL = {"block_out_channels": [16, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                "attention_head_dim": 8}


def vae_config(tmp: Path, dataset: Path, **vae) -> dict:
    return tiny_config(tmp, dataset, vae={**VAE, **vae}, ingest={"eval_fraction": 0.2})


def latent_config(tmp: Path, dataset: Path, vae: Path, **sections) -> dict:
    """The tiny config as a latent model: model.vae set, the patch size left to its latent default (1)."""
    model = sections.pop("model", {})
    train_section = {"max_steps": 8, "checkpoint_every": 4, **sections.pop("train", {})}
    cfg = tiny_config(tmp, dataset, train=train_section, **sections)
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "patch_size"} | LATENT_MODEL | {"vae": str(vae)}
    cfg["model"] |= model
    return cfg


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, shapes_data) -> Path:
    """A tiny VAE (2x downsampling, 4 channels) trained for a few steps by `diffuse train-vae`'s loop."""
    tmp = tmp_path_factory.mktemp("vae")
    return train_vae(Config.model_validate(vae_config(tmp, shapes_data)), progress=False)


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory, shapes_data, tiny_vae, embedding_cache) -> Path:
    tmp = tmp_path_factory.mktemp("latent")
    cfg = latent_config(tmp, shapes_data, tiny_vae, context={"cache_dir": str(embedding_cache)})
    return train(Config.model_validate(cfg), progress=False)


# ------------------------------------------------------------------ the VAE


def test_train_vae_writes_a_diffusers_vae_with_scaling_and_metrics(tiny_vae):
    vae = AutoencoderKL.from_pretrained(str(tiny_vae), local_files_only=True)
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 2
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # measured on the data, not the default
    report = json.loads((tiny_vae.parent / "vae_eval.json").read_text())
    assert report["measured_on"] == "eval split" and report["items"] > 0
    assert 0 < report["psnr"] < 100 and -1 <= report["ssim"] <= 1
    grids = sorted((tiny_vae.parent / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-0000003.png", "step-0000006.png"]
    with Image.open(grids[-1]) as im:  # originals over reconstructions
        assert im.size[1] == 2 * 16
    spec = vae_spec(tiny_vae)
    assert (spec.latent_channels, spec.downsample, spec.scaling_factor) == (4, 2, vae.config.scaling_factor)


def test_scaled_latents_have_unit_variance_and_unscale_inverts_scale(tiny_vae, shapes_data, tmp_path):
    """What the UNet sees: the training images' latent samples with unit variance (the VAE's measured scaling
    factor); unscale inverts scale."""
    from pipeline.model.vae import posterior, scale, unscale

    cfg = Config.model_validate(vae_config(tmp_path, shapes_data))
    data = open_training_data(cfg.data, cfg.ingest)
    x = torch.from_numpy(data.dataset.images(data.images.rows)).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, std = posterior(load_vae(tiny_vae), x)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    spec = vae_spec(tiny_vae)
    scaled = scale(z, spec)
    assert abs(float(scaled.std()) - 1) < 0.05
    assert torch.allclose(scaled, z * spec.scaling_factor) and spec.shift_factor is None  # Stable Diffusion's way
    assert torch.allclose(unscale(scaled, spec), z, atol=1e-5)


def test_a_vae_with_per_channel_statistics_is_scaled_as_diffusers_does(tiny_vae):
    """A VAE whose config has latents_mean / latents_std (e.g. Playground v2.5's): (z - mean) * factor / std, the
    formula diffusers' SDXL pipeline inverts when it decodes."""
    from pipeline.model.vae import scale, unscale

    spec = vae_spec(tiny_vae).model_copy(update={"latents_mean": [1.0, 2.0, 0.0, -1.0],
                                                 "latents_std": [2.0, 0.5, 1.0, 4.0], "scaling_factor": 0.5})
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(spec.latents_mean).view(1, 4, 1, 1), torch.tensor(spec.latents_std).view(1, 4, 1, 1)
    scaled = scale(z, spec)
    assert torch.allclose(scaled, (z - mean) * 0.5 / std)
    assert torch.allclose(scaled * std / 0.5 + mean, z, atol=1e-6)  # diffusers' SDXL decode
    assert torch.allclose(unscale(scaled, spec), z, atol=1e-6)


class StopAt:
    """A metrics logger that interrupts the training at its first log after `step`, as a kill would."""

    def __init__(self, step: int):
        self.step = step

    def log_params(self, params: dict) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        if step > self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")

    def log_image(self, path, step: int) -> None:
        pass


def test_train_vae_resumes_bit_identically(tmp_path, shapes_data):
    full = train_vae(Config.model_validate(vae_config(tmp_path / "full", shapes_data)), progress=False)
    part_cfg = Config.model_validate(vae_config(tmp_path / "part", shapes_data))
    with pytest.raises(KeyboardInterrupt):
        train_vae(part_cfg, progress=False, logger=StopAt(3))
    assert [d.name for d in checkpoint_dirs(tmp_path / "part" / "run")] == ["step-0000003"]
    resumed = train_vae(part_cfg, resume=True, progress=False)
    a = load_file(str(full / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(checkpoint_dirs(tmp_path / "part" / "run")[0] / "vae.safetensors"))
    assert any(not torch.equal(first[k], b[k]) for k in b)  # the resumed half did train


def test_minimal_configs_are_valid(tmp_path, tiny_vae):
    vae_only = Config.model_validate({"run_dir": "r", "data": {"path": "d", "resolution": 64},
                                      "vae": {"max_steps": 10, "batch_size": 4}})
    assert vae_only.vae.downsample == 4
    latent = Config.model_validate({"run_dir": "r", "data": {"path": "d", "resolution": 64},
                                    "model": {"vae": str(tiny_vae)}, "train": {"max_steps": 10, "batch_size": 4}})
    assert latent.model.patch_size == 1  # a latent model runs unpatched unless told otherwise
    assert Config.model_validate(latent.model_dump(mode="json")).model.patch_size == 1
    with pytest.raises(ValueError, match=r"train.cycles\[0\].resolution: a latent model"):
        Config.model_validate({"data": {"path": "d", "resolution": 64}, "model": {"vae": str(tiny_vae)},
                               "train": {"cycles": [{"steps": 5, "resolution": 32}, {"steps": 5}]}})


def _cli_error(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_a_model_vae_that_is_not_a_vae_is_one_clear_error(tmp_path, shapes_data, tiny_vae, latent_model):
    def train_with(vae: Path, **extra) -> str:
        cfg = write_config(tmp_path / "c.yaml", latent_config(tmp_path, shapes_data, vae, **extra))
        return _cli_error("train", "--config", str(cfg), "--overwrite")

    assert "model.vae: " in train_with(tmp_path / "nowhere") and "is not a folder" in train_with(tmp_path / "x")
    assert "has no config.json" in train_with(latent_model)  # a whole model folder, not its vae/
    assert "holds a UNet2DConditionModel, not an AutoencoderKL" in train_with(latent_model / "unet")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_vae / "config.json", weightless / "config.json")
    assert "has no weights" in train_with(weightless)
    # 16 px through 2x downsampling and a 2-level UNet with patch 8: 8x8 latents cannot be halved into patches of 8
    assert "must be multiples of 32 (the VAE's 2x downsampling" in train_with(tiny_vae, model={"patch_size": 8})


def test_a_model_folder_with_another_vae_is_refused(tmp_path, latent_model, tiny_vae):
    copy = tmp_path / "model"
    shutil.copytree(latent_model, copy)
    vae = AutoencoderKL.from_pretrained(str(copy / "vae"))
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # another VAE with the same shapes: decoding would be silently wrong
    vae.save_pretrained(str(copy / "vae"))
    with pytest.raises(UserError, match="not the one this model was trained with"):
        load_model(copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(UserError, match="latent model but its vae/ folder is missing"):
        load_model(copy)


def test_fine_tuning_on_a_vae_with_other_latents_is_refused(tmp_path, shapes_data, tiny_vae, latent_model):
    """train.init_from a latent model, with a VAE of 8 latent channels: the UNet's channels and the VAE both differ,
    one message names them."""
    other = tmp_path / "vae8"
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), norm_num_groups=4, latent_channels=8).save_pretrained(str(other))
    cfg = write_config(tmp_path / "c.yaml", latent_config(tmp_path, shapes_data, other,
                                                          train={"init_from": str(latent_model)}))
    message = _cli_error("train", "--config", str(cfg))
    assert "does not match this config" in message and "model.vae:" in message and "in_channels" in message


# ------------------------------------------------------------------ the latent cache


def _prepared_copy(src: Path, out: Path) -> Path:
    ingest(str(src), out, 16, progress=False, name="data")
    return out


def test_latent_cache_encodes_once_and_exactly_what_changed(tmp_path, shapes_data, tiny_vae):
    folder = tmp_path / "imgs"
    shutil.copytree(shapes_data, folder)
    prepared = _prepared_copy(folder, tmp_path / "prepared" / "data")
    root = tmp_path / "prepared" / "data.latents"
    vae, spec = load_vae(tiny_vae), vae_spec(tiny_vae)

    def run(vae=vae, spec=spec, flip=False, **kw):
        ds = open_prepared(prepared)
        rows = np.arange(len(ds))
        return ensure_latents(ds, rows, vae, spec, root, flip=flip, conditions=False, progress=False, **kw)

    n = len(open_prepared(prepared))
    first = run()
    assert first.encoded == n and len(first.items) == n
    assert run().encoded == 0  # unchanged: nothing

    # one changed image: re-ingested, it is the only item encoded
    one = sorted(folder.glob("*.png"))[5]
    with Image.open(one) as im:
        im.rotate(90).save(one)
    _prepared_copy(folder, prepared)
    assert run().encoded == 1

    # another VAE (different weights): everything again, in its own folder
    other_dir = tmp_path / "other_vae"
    other = AutoencoderKL.from_pretrained(str(tiny_vae))
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.5)
    other.save_pretrained(str(other_dir))
    again = run(vae=load_vae(other_dir), spec=vae_spec(other_dir))
    assert again.encoded == n and again.folder != first.folder
    assert run().encoded == 0  # the first VAE's latents are still there

    # the mirror images as well (data.random_flip): every item is a new entry of two views
    flipped = run(flip=True)
    assert flipped.encoded == n
    assert flipped.items.__getitems__([0, 1])[1].shape == (2, 2, 2, 4, 8, 8)  # (B, views, mean/std, C, h, w)


def test_latent_encoding_resumes_after_a_kill(tmp_path, shapes_data, tiny_vae, monkeypatch):
    """A kill between two parts loses only the part being written; the next run encodes just the rest."""
    import pipeline.training.latents as latents

    prepared = _prepared_copy(shapes_data, tmp_path / "data")
    ds = open_prepared(prepared)
    rows, root = np.arange(len(ds)), tmp_path / "data.latents"
    vae, spec = load_vae(tiny_vae), vae_spec(tiny_vae)
    monkeypatch.setattr(latents, "CHUNK", 16)
    written = []
    real_write = latents._write_part

    def dying_write(folder, keys, array, part):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # the third part is never written
        written.append(len(keys))
        real_write(folder, keys, array, part)

    monkeypatch.setattr(latents, "_write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        ensure_latents(ds, rows, vae, spec, root, flip=False, conditions=False, progress=False)
    monkeypatch.setattr(latents, "_write_part", real_write)
    assert not list((root / spec.sha256[:16]).glob(".*tmp*"))  # nothing half-written is visible
    rest = ensure_latents(ds, rows, vae, spec, root, flip=False, conditions=False, progress=False)
    assert rest.encoded == len(ds) - 32
    # the latents match an uninterrupted encoding
    clean = ensure_latents(ds, rows, vae, spec, tmp_path / "clean", flip=False, conditions=False, progress=False)
    assert np.array_equal(rest.items.__getitems__(list(range(len(ds))))[1].numpy(),
                          clean.items.__getitems__(list(range(len(ds))))[1].numpy())


# ------------------------------------------------------------------ the latent model


def test_latent_model_trains_resumes_and_records_its_vae(tmp_path, shapes_data, tiny_vae, latent_model,
                                                         embedding_cache):
    spec = json.loads((latent_model / "conditioning.json").read_text())
    assert spec["vae"]["sha256"] == vae_spec(tiny_vae).sha256 and spec["vae"]["source"] == str(tiny_vae.resolve())
    assert (latent_model / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # copied in: self-contained
    unet = UNet2DConditionModel.from_pretrained(str(latent_model / "unet"))
    assert unet.config.sample_size == 8 and unet.config.out_channels == 4  # 16 px -> 8x8x4 latents

    cfg = latent_config(tmp_path, shapes_data, tiny_vae, context={"cache_dir": str(embedding_cache)},
                        data={"random_flip": True})
    full = train(Config.model_validate(cfg), progress=False)
    half = Config.model_validate(latent_config(tmp_path / "half", shapes_data, tiny_vae, data={"random_flip": True},
                                               context={"cache_dir": str(embedding_cache)}))
    with pytest.raises(KeyboardInterrupt):
        train(half, progress=False, logger=StopAt(4))
    assert [d.name for d in checkpoint_dirs(tmp_path / "half" / "run")] == ["step-0000004"]
    resumed = train(half, resume=True, progress=False)
    a = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latent_model_samples_at_any_size_img2img_and_evaluates(latent_model, tmp_path):
    model = load_model(latent_model)
    images = generate(model, ["a red circle", "a blue square"], [0, 1], steps=3)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert not torch.equal(images[0], images[1])
    wide = generate(model, ["a red circle"], [0], steps=3, width=32, height=16)
    assert wide.shape == (1, 3, 16, 32)
    with pytest.raises(UserError, match="multiples of 4"):
        generate(model, ["a red circle"], [0], steps=3, width=18)
    init = torch.zeros(1, 3, 16, 16)
    kept = generate(model, ["a red circle"], [0], steps=4, init_images=init, strength=0.0)
    assert torch.equal(kept, torch.full_like(kept, 128))  # strength 0 returns the init image
    changed = generate(model, ["a red circle"], [0], steps=4, init_images=init, strength=0.5)
    assert changed.shape == (1, 3, 16, 16) and not torch.equal(changed, kept)

    out = tmp_path / "samples"
    result = invoke("sample", "-m", str(latent_model), "-p", "a red circle", "--num", "1", "--steps", "2",
                    "--width", "32", "--height", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out / "0000-seed0.png") as im:
        assert im.size == (32, 16)

    from pipeline.config import EvaluationConfig

    report = evaluate(latent_model, EvaluationConfig(num_items=8, steps=2, prompts=["a red circle"] * 4))
    assert report["vae"]["sha256"] == model.spec.vae.sha256
    assert 0 < report["metrics"]["denoise_mse"] < 10 and "copy_rate" in report["metrics"]


def test_latent_doodle_model_follows_a_doodle_in_latent_space(tmp_path, tiny_vae, embedding_cache):
    from pipeline.shapes import dataset as shapes

    data = tmp_path / "doodles"
    shapes.make_dataset(data, 32, resolution=16, seed=1, doodles=True)
    cfg = latent_config(tmp_path, data, tiny_vae, context={"cache_dir": str(embedding_cache),
                                                           "image_condition": True},
                        data={"condition_column": "conditioning_image"}, train={"max_steps": 4})
    model = load_model(train(Config.model_validate(cfg), progress=False))
    assert model.spec.condition_channels == 4  # the doodle enters as latents
    assert model.unet.config.in_channels == 4 + 2 + 4  # latents, coordinates, condition latents
    doodle = torch.ones(2, 3, 16, 16)
    doodle[:, :, 4:12, 4:12] = -1
    images = generate(model, ["a red circle"] * 2, [0, 0], steps=3, cond_images=doodle[:1].expand(2, -1, -1, -1),
                      image_guidance=2.0)
    blank = generate(model, ["a red circle"], [0], steps=3, cond_images=torch.ones(1, 3, 16, 16),
                     image_guidance=2.0)
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], blank[0])


def test_a_latent_model_trains_on_aspect_ratio_buckets(tmp_path, tiny_vae, embedding_cache, monkeypatch):
    """Bucketed images as latents: every batch one latent size (flips and doodles included), samples at a
    bucket's size."""
    import pipeline.training.loop
    from pipeline.training.objective import diffusion_loss
    from tests.test_buckets import make_source

    shapes = []

    def recording_loss(*args, **kwargs):
        x0, cond = args[3], args[-1]
        assert cond.shape == x0.shape and x0.shape[1] == 4
        shapes.append(tuple(x0.shape[-2:]))
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(pipeline.training.loop, "diffusion_loss", recording_loss)
    cfg = latent_config(tmp_path, make_source(tmp_path / "src"), tiny_vae,
                        ingest={"doodles": True, "buckets": {"enabled": True, "step": 4}},
                        data={"random_flip": True}, context={"cache_dir": str(embedding_cache),
                                                             "image_condition": True},
                        train={"batch_size": 4, "max_steps": 6})
    model = load_model(train(Config.model_validate(cfg), progress=False))
    assert set(shapes) == {(10, 6), (8, 8), (6, 10)}  # the 20x12, 16x16 and 12x20 buckets, halved by the VAE
    images = generate(model, ["a red thing"], [0], steps=2, width=20, height=12,
                      cond_images=torch.ones(1, 3, 12, 20))
    assert images.shape == (1, 3, 12, 20)


def test_pyfunc_and_batch_generation_serve_a_latent_model(latent_model, tmp_path):
    import pandas as pd

    from pipeline.generation.batch import generate_shard
    from pipeline.generation.prompt_store import open_store, parse_prompt
    from pipeline.registry.pyfunc import DiffusionPyfunc

    served = DiffusionPyfunc()
    served.load_context(type("Context", (), {"artifacts": {"model_dir": str(latent_model)}})())
    out = served.predict(None, pd.DataFrame({"prompt": ["a red circle", "a blue square"], "steps": [2, 2]}))
    assert out["error"].tolist() == ["", ""] and all(out["image"])

    config = write_config(tmp_path / "gen.yaml", {"generation": {
        "store_url": f"sqlite:///{tmp_path / 'prompts.db'}", "artifact_root": str(tmp_path / "out"), "steps": 2,
        "num_threads": 1}, "tracking": {"enabled": False}})
    store = open_store(f"sqlite:///{tmp_path / 'prompts.db'}")
    from pipeline.config import GenerationConfig

    store.add([parse_prompt({"text": "a red circle", "num_images": 2}, GenerationConfig(steps=2)),
               parse_prompt({"text": "a blue square", "size": 32}, GenerationConfig(steps=2))])
    store.close()
    summary = generate_shard(str(latent_model), config=config)
    assert summary.images == 3 and not summary.failed
    sizes = sorted(Image.open(f).size for f in (tmp_path / "out").rglob("*.png"))
    assert sizes == [(16, 16), (16, 16), (32, 32)]  # a prompt's size: any side the model can make


@pytest.mark.slow
def test_two_ranks_share_the_encoding(tmp_path, shapes_data, tiny_vae, embedding_cache):
    """Under torchrun each rank encodes its share of what is missing; together they fill the cache once."""
    cfg = latent_config(tmp_path, shapes_data, tiny_vae, context={"cache_dir": str(embedding_cache)},
                        train={"max_steps": 2, "checkpoint_every": 2},
                        data={"prepared_cache": str(tmp_path / "prepared")})
    config = write_config(tmp_path / "ddp.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "-m", "pipeline.cli", "train", "--config",
                           str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = cache_root(Config.model_validate(cfg).data) / vae_spec(tiny_vae).sha256[:16]
    ranks = {p.name.split("-r")[-1].split(".")[0] for p in folder.glob("part-*.keys.npy")}
    assert ranks == {"0", "1"}
    counts = [len(np.load(p)) for p in folder.glob("part-*.keys.npy")]
    data = open_training_data(Config.model_validate(cfg).data, Config.model_validate(cfg).ingest)
    assert sum(counts) == len(data.captions) and abs(counts[0] - counts[1]) <= 1
    result = invoke("data", "encode", "--config", str(config))
    assert result.exit_code == 0 and "0 images encoded now" in result.output, result.output
