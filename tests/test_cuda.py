"""CUDA paths (bf16 autocast, fused AdamW, TF32). Run on a GPU machine by bench/gpu_check.sh; on a CPU-only
machine these are reported as skipped by `make test`."""

import pytest
import torch

from pipeline.config import Config
from tests.conftest import tiny_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")]


def test_bf16_training_on_cuda_learns(tmp_path, shapes_data):
    import json

    from pipeline.training.loop import train

    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 60, "log_every": 10})
    model_dir = train(Config.model_validate(raw), progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    assert (model_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_bf16_sampling_matches_fp32(trained_tiny):
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import generate

    model = load_model(trained_tiny, device="cuda")
    prompt = ["a large red circle in the center on a white background"] * 4
    fp32 = generate(model, prompt, [0, 1, 2, 3], steps=10).float()
    bf16 = generate(model, prompt, [0, 1, 2, 3], steps=10, autocast_dtype=torch.bfloat16).float()
    assert (fp32 - bf16).abs().mean() < 8  # bf16 rounding, not a different image


def test_latent_model_on_cuda_encodes_trains_and_samples(tmp_path, shapes_data):
    """The VAE on the GPU: train-vae, the latent cache filled on the device, bf16 training with gradient
    checkpointing, sampling decoded there."""
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import generate
    from pipeline.training.loop import train
    from pipeline.training.vae_loop import train_vae

    vae_cfg = tiny_config(tmp_path / "vae", shapes_data, vae={"block_out_channels": [8, 16], "norm_num_groups": 4,
                                                              "max_steps": 10, "batch_size": 8})
    vae = train_vae(Config.model_validate(vae_cfg), progress=False)
    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 20, "gradient_checkpointing": True})
    raw["model"] = {k: v for k, v in raw["model"].items() if k != "patch_size"} | {"vae": str(vae)}
    model = load_model(train(Config.model_validate(raw), progress=False), device="cuda")
    assert next(model.vae.parameters()).is_cuda
    images = generate(model, ["a red circle"] * 2, [0, 1], steps=4, autocast_dtype=torch.bfloat16)
    assert images.shape == (2, 3, 16, 16)
