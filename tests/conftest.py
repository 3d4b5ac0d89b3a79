"""Shared fixtures: a tiny shapes dataset and tiny training configs (seconds, not minutes, on a CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DIFFUSE = [sys.executable, "-m", "pipeline.cli"]
pytest_plugins = ["s3_server"]  # the `s3_server` fixture: a real local S3 server


def tiny_config(tmp: Path, dataset: Path, **sections) -> dict:
    cfg = {
        "run_dir": str(tmp / "run"),
        "seed": 0,
        "data": {"path": str(dataset), "resolution": 16, "prepared_cache": str(tmp / "prepared")},
        # shapes differ in colour, which a perceptual hash does not see: keep near duplicates, flagged
        "ingest": {"near_duplicates": "flag", "workers": 1, "eval_fraction": 0.0},
        "context": {"encoder": "minilm", "max_length": 16, "attach": "both", "cache_dir": str(tmp / "cache")},
        "model": {"block_out_channels": [32, 32], "layers_per_block": 1, "attention_levels": [False, True],
                  "attention_head_dim": 8, "norm_num_groups": 8, "patch_size": 2, "coord_channels": True},
        "diffusion": {"prediction_type": "v_prediction", "loss_weighting": "none"},
        "train": {"batch_size": 8, "lr": 0.002, "warmup_steps": 2, "max_steps": 20, "log_every": 5,
                  "checkpoint_every": 10, "keep_last": 2, "num_threads": 1},
        "tracking": {"enabled": False},  # MLflow tests (tests/test_mlflow_*.py) turn it on with their own store
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    if "cycles" in sections.get("train", {}) and "max_steps" not in sections["train"]:
        del cfg["train"]["max_steps"]  # the total of the cycles
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    from pipeline.shapes import dataset as shapes

    out = tmp_path_factory.mktemp("shapes") / "data"
    shapes.make_dataset(out, 64, resolution=16, seed=0)
    return out


@pytest.fixture(scope="session")
def embedding_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, shapes_data) -> Path:
    """One tiny model trained once for the sampling tests."""
    from pipeline.config import Config
    from pipeline.training.loop import train

    tmp = tmp_path_factory.mktemp("tiny_model")
    cfg = Config.model_validate(tiny_config(tmp, shapes_data, train={"max_steps": 30}))
    return train(cfg, progress=False)


@pytest.fixture(scope="session")
def doodle_model(trained_tiny, tmp_path_factory):
    """The tiny text-only model extended with condition channels, whose new weights are then made non-zero
    (as training would) so the doodle matters. A LoadedModel; its folder is `.path`."""
    import torch
    from diffusers import DDPMScheduler

    from pipeline.model.folder import load_model, save_model
    from pipeline.model.network import extend_condition_channels

    model = load_model(trained_tiny)
    unet, spec = extend_condition_channels(model.unet, model.spec, 3)
    with torch.no_grad():
        w = unet.conv_in.weight
        w[:, -12:] = torch.randn(w[:, -12:].shape, generator=torch.Generator().manual_seed(0)) * w[:, :12].std()
    out = tmp_path_factory.mktemp("doodle_model") / "model"
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    return load_model(save_model(out, unet, scheduler, spec))


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the CI machine has 2 shared cores); the count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    import subprocess

    return subprocess.run([*DIFFUSE, *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def invoke(*args: str):
    """Run the `diffuse` CLI in-process; a user-facing failure must never show a traceback."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result
