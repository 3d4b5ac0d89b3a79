"""The metrics of the evaluation protocol (pipeline/evaluation/protocol.py), each on fixed inputs.

- denoising MSE per timestep range on held-out images (a latent model: on their latents), as epsilon-MSE so epsilon-
  and v-prediction models compare;
- copy rate: the share of generated images whose nearest training image is closer than a threshold (memorisation);
- FID and KID (torchmetrics) on the features of a local TorchScript Inception file, CLIP score (torchmetrics) with a
  local CLIP model: nothing is downloaded, and without the weights the caller records them as skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from pipeline.images import arrays_to_tensor, channels_first
from pipeline.model.network import denoise
from pipeline.model.sampling import encode_prompts
from pipeline.model.vae import encode


@torch.no_grad()
def denoising_mse(model, images: np.ndarray, captions: list[str], buckets: int, seed: int,
                  batch_size: int = 64) -> dict[str, float]:
    """Epsilon-MSE per equal timestep range, each item at one seeded timestep and noise draw per range."""
    sched = DDPMScheduler.from_config(model.scheduler_config)
    total = sched.config.num_train_timesteps
    device = next(model.unet.parameters()).device
    x0_all = arrays_to_tensor(images)
    if model.vae is not None:  # a latent model denoises the images' latents (posterior means, scaled)
        x0_all = encode(model.vae, model.spec.vae, x0_all.to(device)).cpu()
    ctx_all = encode_prompts(model.spec, captions)
    out = {}
    for b in range(buckets):
        lo, hi = b * total // buckets, max((b + 1) * total // buckets, b * total // buckets + 1)
        g = torch.Generator().manual_seed(seed * 1000 + b)
        t_all = torch.randint(lo, hi, (len(captions),), generator=g)
        noise_all = torch.randn(x0_all.shape, generator=g)
        errs = []
        for i in range(0, len(captions), batch_size):
            sl = slice(i, i + batch_size)
            x0, noise, t = x0_all[sl].to(device), noise_all[sl].to(device), t_all[sl].to(device)
            x_t = sched.add_noise(x0, noise, t)
            ctx = ctx_all.index(torch.arange(i, min(i + batch_size, len(captions))))
            ctx = type(ctx)(*[None if a is None else a.to(device) for a in ctx.astuple()])
            pred = denoise(model.unet, model.spec, x_t, t, ctx).float()
            if sched.config.prediction_type == "v_prediction":  # eps = sqrt(ab) * v + sqrt(1 - ab) * x_t
                ab = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
                pred = ab.sqrt() * pred + (1 - ab).sqrt() * x_t
            errs.append(((pred - noise) ** 2).mean(dim=(1, 2, 3)).cpu())
        out[f"denoise_mse_t{lo:04d}_{hi:04d}"] = float(torch.cat(errs).mean())
    out["denoise_mse"] = float(np.mean(list(out.values())))
    return out


def copy_rate(generated: torch.Tensor, dataset, train_rows: np.ndarray, data_resolution: int, resolution: int,
              threshold: float, chunk: int = 4096) -> dict[str, float]:
    """Share of generated images (N, 3, R, R uint8) whose nearest training image (rows `train_rows` of the prepared
    `dataset`, brought to `data_resolution`; a bucketed dataset's centre squares), compared as RMS pixel distance
    on a 0..1 scale at `resolution`, is closer than `threshold`. Training images are read in chunks."""

    def small(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="area")
        return x.flatten(1)

    gen = small(generated)
    best = torch.full((len(gen),), float("inf"))
    for i in range(0, len(train_rows), chunk):
        pixels = dataset.square_images(train_rows[i:i + chunk], data_resolution)
        ref = small(channels_first(pixels))
        best = torch.minimum(best, torch.cdist(gen, ref).min(dim=1).values)
    rms = best / gen.shape[1] ** 0.5
    return {"copy_rate": float((rms < threshold).float().mean()), "nearest_train_distance_mean": float(rms.mean()),
            "nearest_train_distance_min": float(rms.min())}


class InceptionFeatures(torch.nn.Module):
    """A TorchScript Inception feature extractor (the clean-fid / StyleGAN3 `inception-2015-12-05.pt` convention:
    float images in 0..255 at 299x299, called with return_features=True) as torchmetrics' `feature` module."""

    def __init__(self, path: Path):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        try:
            f = self.net(x, return_features=True)
        except (RuntimeError, TypeError):  # a plain feature extractor without the flag
            f = self.net(x)
        return f.reshape(len(x), -1)


class _Given(torch.nn.Module):
    """Features computed beforehand, handed to torchmetrics as they are: each image goes through Inception once
    for both FID and KID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_and_kid(path: Path, real: torch.Tensor, generated: torch.Tensor, seed: int,
                batch_size: int = 32) -> dict[str, float]:
    """FID and KID between (N, 3, R, R) uint8 image sets. KID's subsets are drawn with `seed`: the same inputs give
    the same number."""
    extract = InceptionFeatures(path)
    features = {is_real: torch.cat([extract(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
                for images, is_real in ((real, True), (generated, False))}
    given = _Given(features[True].shape[1])
    fid = FrechetInceptionDistance(feature=given, reset_real_features=True)
    kid = KernelInceptionDistance(feature=given, subsets=10, subset_size=min(len(real), len(generated)))
    for is_real, f in features.items():
        fid.update(f, real=is_real)
        kid.update(f, real=is_real)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


class _ClipEmbeddings(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors, as
    torchmetrics' CLIP score reads them (transformers 5 returns output objects that carry them as pooler_output)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _embedding(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embedding(self.model.get_text_features(*args, **kwargs))


def clip_score(path: Path, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> float:
    """100 x cosine(image, text), clipped at 0 and averaged (torchmetrics' CLIP score), with a local CLIP model."""

    def local_model():
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(str(path), local_files_only=True)

    metric = CLIPScore(model_name_or_path=local_model)
    for i in range(0, len(images), batch_size):
        metric.update(list(images[i:i + batch_size]), prompts[i:i + batch_size])
    return float(metric.compute())
