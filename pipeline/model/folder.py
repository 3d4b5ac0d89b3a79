"""The model format: a diffusers-format folder plus one small file about the conditioning.

    model/
        unet/               UNet2DConditionModel.from_pretrained(model / "unet") loads it
        scheduler/          the training noise schedule (DDPMScheduler config)
        vae/                a latent model's AutoencoderKL, copied in (conditioning.json names its source and hash)
        conditioning.json   ModelSpec: encoder, how context attaches, patching, resolution, the VAE
        train_config.yaml   the resolved training configuration (for the record)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from diffusers import UNet2DConditionModel
from pydantic import ValidationError

from pipeline.config import Config, load_saved_config
from pipeline.errors import UserError
from pipeline.model.network import ModelSpec
from pipeline.model.vae import load_vae


@dataclass
class LoadedModel:
    unet: object
    scheduler_config: dict
    spec: ModelSpec
    path: Path
    vae: object | None = None  # a latent model's AutoencoderKL


def save_model(out: Path, unet, scheduler, spec: ModelSpec, train_config: dict | None = None,
               vae_dir: Path | None = None) -> Path:
    """Write the model folder atomically; a latent model's VAE folder `vae_dir` is copied in, so the folder is
    complete wherever it goes (the registry, a serving container)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    if vae_dir is not None:
        shutil.copytree(vae_dir, tmp / "vae", ignore=shutil.ignore_patterns(".*"))
    (tmp / "conditioning.json").write_text(spec.model_dump_json(indent=2))
    if train_config is not None:
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(train_config, sort_keys=False))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_train_config(model_dir: Path) -> Config | None:
    """The training configuration saved with the model (None for a folder without one)."""
    f = Path(model_dir) / "train_config.yaml"
    return load_saved_config(f) if f.is_file() else None


def load_model(path: Path, device: str = "cpu") -> LoadedModel:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path} (train one with `diffuse train`)")
    missing = [n for n in ("unet/config.json", "scheduler/scheduler_config.json", "conditioning.json")
               if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path} is not a model made by `diffuse train`: missing {', '.join(missing)}")
    try:
        spec = ModelSpec.model_validate_json((path / "conditioning.json").read_text())
    except ValidationError as e:
        raise UserError(f"{path}/conditioning.json is invalid: {e.errors()[0]['msg']}") from None

    try:
        unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
    except Exception as e:
        raise UserError(f"{path}/unet could not be loaded ({type(e).__name__}: {str(e)[:300]}); "
                        "the weights are missing or corrupt: re-export the model from its run") from None
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if spec.vae and not (path / "vae" / "config.json").is_file():
        raise UserError(f"{path} is a latent model but its vae/ folder is missing: re-export the model from its run "
                        f"(the VAE it was trained with came from {spec.vae.source})")
    vae = load_vae(path / "vae", device, expected=spec.vae) if spec.vae else None
    return LoadedModel(unet.to(device).eval(), scheduler_config, spec, path, vae)
