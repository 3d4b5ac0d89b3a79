"""The denoiser: a diffusers UNet2DConditionModel, plus how context and pixels are fed to it.

`ModelSpec` is everything besides the UNet's own config that is needed to use the weights: how images are
patched, which encoder makes the context and how it is attached. It is saved as `conditioning.json` next to
the diffusers-format `unet/` and `scheduler/` folders.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from pipeline.encoders import ContextBatch


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = 1
    resolution: int
    patch_size: int
    coord_channels: bool
    coord_frequencies: int = 0
    encoder: Literal["minilm", "clip", "category"]
    encoder_id: str
    max_length: int
    clip_path: Path | None = None
    categories: list[str] | None = None
    attach: Literal["cross_attention", "additive", "both"]
    context_dim: int
    prediction_type: str
    context_stats: dict[str, list[float]] | None = None  # per-channel standardization of the context

    @property
    def uses_tokens(self) -> bool:
        return self.encoder != "category" and self.attach in ("cross_attention", "both")

    @property
    def uses_pooled(self) -> bool:
        return self.encoder != "category" and self.attach in ("additive", "both")


def coord_channel_count(spec: ModelSpec) -> int:
    return (2 + 4 * spec.coord_frequencies) if spec.coord_channels else 0


def build_unet(spec: ModelSpec, block_out_channels, layers_per_block: int, attention_levels,
               attention_head_dim: int, norm_num_groups: int, scale_shift: bool = False):
    from diffusers import UNet2DConditionModel

    p = spec.patch_size
    cross = spec.uses_tokens
    down = ["CrossAttnDownBlock2D" if (a and cross) else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if (a and cross) else "UpBlock2D" for a in reversed(attention_levels)]
    kwargs = dict(
        sample_size=spec.resolution // p,
        in_channels=3 * p * p + coord_channel_count(spec),
        out_channels=3 * p * p,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if cross else "UNetMidBlock2D",
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=spec.context_dim if cross else None,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )
    if spec.uses_pooled:  # additive: pooled embedding projected and added to the timestep embedding
        kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=spec.context_dim)
    if spec.encoder == "category":  # one extra row: the null class used for guidance
        kwargs.update(num_class_embeds=len(spec.categories or []) + 1)
    if kwargs["cross_attention_dim"] is None:
        kwargs.pop("cross_attention_dim")
    return UNet2DConditionModel(**kwargs)


def _coords(batch: int, res: int, frequencies: int, like: torch.Tensor) -> torch.Tensor:
    """x/y in [-1, 1], plus sin/cos of them at octaves 1..frequencies."""
    lin = torch.linspace(-1.0, 1.0, res, device=like.device, dtype=like.dtype)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    chans = [xx, yy]
    for k in range(frequencies):
        f = math.pi * 2**k
        chans += [torch.sin(f * xx), torch.cos(f * xx), torch.sin(f * yy), torch.cos(f * yy)]
    return torch.stack(chans).expand(batch, len(chans), res, res)


def denoise(unet, spec: ModelSpec, x_t: torch.Tensor, t: torch.Tensor, ctx: ContextBatch) -> torch.Tensor:
    """The network's prediction (epsilon or v, per the scheduler config) for noisy images x_t at timesteps t."""
    p = spec.patch_size
    h = F.pixel_unshuffle(x_t, p) if p > 1 else x_t
    if spec.coord_channels:
        h = torch.cat([h, _coords(h.shape[0], h.shape[-1], spec.coord_frequencies, h)], dim=1)
    if ctx.labels is not None:
        class_labels = ctx.labels
    else:
        class_labels = ctx.pooled if spec.uses_pooled else None
    out = unet(
        h,
        t,
        encoder_hidden_states=ctx.tokens if spec.uses_tokens else None,
        encoder_attention_mask=ctx.mask if spec.uses_tokens else None,
        class_labels=class_labels,
        return_dict=False,
    )[0]
    return F.pixel_shuffle(out, p) if p > 1 else out
