"""The training objective: noise an image to a random timestep, let the network predict the noise (or v), MSE;
plus the classifier-free-guidance dropout of the caption and of the condition image."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from pipeline.model.encoders import ContextBatch
from pipeline.model.network import ModelSpec, denoise
from pipeline.training.distributed import WHOLE, Part


def loss_weight(scheduler, t: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
    """Per-sample weight on the MSE of the network's own target (epsilon or v): 1 for `none`; for `min_snr`
    (Hang et al. 2023) the x0-weight min(SNR, gamma), written on the target's MSE (the epsilon-MSE is the x0-MSE
    times SNR, the v-MSE the x0-MSE times SNR + 1)."""
    if weighting == "none":
        return torch.ones_like(t, dtype=torch.float32)
    snr = compute_snr(scheduler, t)
    plain_x0_weight = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return snr.clamp(max=gamma) / plain_x0_weight


def diffusion_loss(unet, spec: ModelSpec, scheduler, x0: torch.Tensor, ctx: ContextBatch,
                   generator: torch.Generator, weighting: str = "none", gamma: float = 5.0,
                   part: Part = WHOLE, cond: torch.Tensor | None = None) -> torch.Tensor:
    """One noise-prediction loss on a batch of clean images x0 in [-1, 1] (and condition images `cond`).

    Under DDP x0 is this rank's share of the global batch: t and noise are drawn for the whole global batch and
    `part` keeps this rank's rows, so the numbers do not depend on the world size (pipeline/training/distributed.py).
    """
    b = x0.shape[0] * part.world
    t = part.take(torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)).to(x0.device)
    noise = part.take(torch.randn((b, *x0.shape[1:]), generator=generator)).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)  # sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise
    pred = denoise(unet, spec, x_t, t, ctx, cond)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    mse = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    return (loss_weight(scheduler, t, weighting, gamma) * mse).mean()


def cfg_dropout(caption_rows: torch.Tensor, p: float, null_row: int, generator: torch.Generator,
                part: Part = WHOLE) -> torch.Tensor:
    """Per sample, with probability p, swap the caption for the null (empty-prompt) embedding row.
    Drawn afresh at every step from the training generator, so which samples drop changes each step
    (for the whole global batch under DDP; `part` keeps this rank's rows)."""
    drop = part.take(torch.rand((caption_rows.shape[0] * part.world,), generator=generator)) < p
    return torch.where(drop, torch.full_like(caption_rows, null_row), caption_rows)


def image_dropout(cond: torch.Tensor, present: torch.Tensor, p: float, generator: torch.Generator,
                  part: Part = WHOLE) -> torch.Tensor:
    """Per sample, with probability p (drawn independently of the caption's dropout), replace the condition image
    by the null condition (zeros), as for an item that has none (`present` False). Both conditions dropped
    together then happen with probability p * cfg_dropout: the three predictions image+text guidance needs."""
    drop = part.take(torch.rand((cond.shape[0] * part.world,), generator=generator)) < p
    keep = (~drop).to(cond.device) & present.to(cond.device)
    return torch.where(keep[:, None, None, None], cond, torch.zeros_like(cond))
