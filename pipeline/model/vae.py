"""The VAE of a latent model: a local diffusers AutoencoderKL folder, read, identified and applied as diffusers does.

A latent model denoises `(z - shift_factor) * scaling_factor`, where z is the VAE's posterior for an image, or, for a
VAE whose config has per-channel `latents_mean` / `latents_std` (as the one `diffuse train-vae` writes, and as
diffusers' SDXL pipeline reads them), `(z - latents_mean) * scaling_factor / latents_std`; images come back through
`decode`. `VaeSpec` is what a model folder records about its VAE (conditioning.json): where it came
from, its content hash (a different VAE at load time is an error, not silent garbage) and its latent geometry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from pydantic import BaseModel, ConfigDict

from pipeline.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# larger images are decoded in overlapping tiles (diffusers' tiled decoding): memory stays bounded
TILE_ABOVE_PX = 1024


class VaeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str  # the folder the model was trained against
    sha256: str  # content hash of config.json + weights
    latent_channels: int
    downsample: int  # pixels per latent, per side
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: list[float] | None = None  # per channel; with latents_std they replace shift_factor
    latents_std: list[float] | None = None


def _config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model.vae: {path} is not a folder (a diffusers AutoencoderKL folder: config.json + "
                        "diffusion_pytorch_model.safetensors, e.g. the vae/ of a Stable Diffusion pipeline, or "
                        "RUN_DIR/vae of `diffuse train-vae`)")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"model.vae: {path} has no config.json, so it is not a diffusers VAE folder (for a whole "
                        f"Stable Diffusion pipeline, give its vae/ subfolder)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model.vae: {path}/config.json is unreadable ({e})") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"model.vae: {path} holds a {config.get('_class_name') or 'model of unknown class'}, not an "
                        "AutoencoderKL (the VAE of Stable Diffusion-style pipelines)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"model.vae: {path} has no weights ({' or '.join(WEIGHT_FILES)})")
    return config


def content_hash(path: Path) -> str:
    """sha256 of the VAE's config.json and weight file: the identity of a VAE, whatever folder it sits in."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", *WEIGHT_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def vae_spec(path: Path) -> VaeSpec:
    """What a latent model records about the VAE at `path` (checked to be an AutoencoderKL folder)."""
    config = _config(path)
    return VaeSpec(source=str(Path(path).resolve()), sha256=content_hash(path),
                   latent_channels=int(config.get("latent_channels", 4)),
                   downsample=2 ** (len(config.get("block_out_channels", [0])) - 1),
                   scaling_factor=float(config.get("scaling_factor", 0.18215)),
                   shift_factor=config.get("shift_factor"), latents_mean=config.get("latents_mean"),
                   latents_std=config.get("latents_std"))


def load_vae(path: Path, device: str | torch.device = "cpu", expected: VaeSpec | None = None) -> AutoencoderKL:
    """The AutoencoderKL at `path`, frozen, in eval mode; with `expected`, it must be that VAE (same content)."""
    _config(path)
    if expected is not None and content_hash(path) != expected.sha256:
        raise UserError(f"the VAE at {path} is not the one this model was trained with (content hash differs from "
                        f"{expected.sha256[:12]}, trained against {expected.source}): use that VAE")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UserError(f"model.vae: {path} could not be loaded ({type(e).__name__}: {str(e)[:300]})") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent posterior for images in [-1, 1], unscaled."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def _per_channel(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def scale(z: torch.Tensor, spec: VaeSpec) -> torch.Tensor:
    """VAE latents -> what the UNet denoises (diffusers' conventions: per-channel mean and std when the VAE has
    them, else shift, then scale)."""
    if spec.latents_mean is not None and spec.latents_std is not None:
        return (z - _per_channel(spec.latents_mean, z)) * spec.scaling_factor / _per_channel(spec.latents_std, z)
    return (z - (spec.shift_factor or 0.0)) * spec.scaling_factor


def unscale(x: torch.Tensor, spec: VaeSpec) -> torch.Tensor:
    if spec.latents_mean is not None and spec.latents_std is not None:
        return x * _per_channel(spec.latents_std, x) / spec.scaling_factor + _per_channel(spec.latents_mean, x)
    return x / spec.scaling_factor + (spec.shift_factor or 0.0)


@torch.no_grad()
def encode(vae: AutoencoderKL, spec: VaeSpec, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] -> scaled posterior means (img2img starts, condition images, held-out items)."""
    out = [scale(posterior(vae, images[i:i + batch_size])[0].float(), spec) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode(vae: AutoencoderKL, spec: VaeSpec, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]; one image at a time (sliced), tiled above TILE_ABOVE_PX."""
    vae.enable_slicing()
    if max(latents.shape[-2:]) * spec.downsample > TILE_ABOVE_PX:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    return vae.decode(unscale(latents, spec).to(vae.device, vae.dtype)).sample.float()
