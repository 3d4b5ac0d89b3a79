"""The denoiser: a diffusers UNet2DConditionModel, plus how context and pixels are fed to it.

`ModelSpec` is everything besides the UNet's own config that is needed to use the weights: how images are
patched, which encoder makes the context and how it is attached, and for a latent model which VAE's latents it
denoises. It is saved as `conditioning.json` next to the diffusers-format `unet/`, `scheduler/` (and `vae/`) folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.errors import UserError
from pipeline.model.encoders import ContextBatch
from pipeline.model.vae import VaeSpec


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = 1
    resolution: int
    patch_size: int
    coord_channels: bool
    encoder: Literal["minilm", "clip", "category"]
    encoder_id: str
    max_length: int
    clip_path: Path | None = None
    categories: list[str] | None = None
    attach: Literal["cross_attention", "additive", "both"]
    context_dim: int
    prediction_type: str
    context_stats: dict[str, list] | None = None  # standardization (and whitening) of the context
    condition_channels: int = 0  # channels of the condition image (a doodle: 3), fed beside the noisy image; 0: none
    vae: VaeSpec | None = None  # a latent model: the VAE whose (scaled) latents the UNet denoises

    @model_validator(mode="before")
    @classmethod
    def _earlier_format(cls, raw):
        # model folders written before the retired coordinate-frequency option carry it at its default, 0
        if isinstance(raw, dict) and raw.get("coord_frequencies", 0) == 0:
            raw = {k: v for k, v in raw.items() if k != "coord_frequencies"}
        return raw

    @property
    def uses_tokens(self) -> bool:
        return self.encoder != "category" and self.attach in ("cross_attention", "both")

    @property
    def uses_pooled(self) -> bool:
        return self.encoder != "category" and self.attach in ("additive", "both")

    @property
    def sample_channels(self) -> int:
        """Channels of what the UNet denoises: RGB pixels, or the VAE's latents."""
        return self.vae.latent_channels if self.vae else 3

    @property
    def downsample(self) -> int:
        """Image pixels per denoised sample, per side (1 for a pixel model)."""
        return self.vae.downsample if self.vae else 1


def coord_channel_count(spec: ModelSpec) -> int:
    return 2 if spec.coord_channels else 0


def input_channel_count(spec: ModelSpec) -> int:
    """UNet input channels, in this order: the (patched) noisy sample, coordinates, the (patched) condition image."""
    p2 = spec.patch_size**2
    return spec.sample_channels * p2 + coord_channel_count(spec) + spec.condition_channels * p2


def build_unet(spec: ModelSpec, block_out_channels, layers_per_block: int, attention_levels,
               attention_head_dim: int, norm_num_groups: int, scale_shift: bool = False):
    p = spec.patch_size
    cross = spec.uses_tokens
    down = ["CrossAttnDownBlock2D" if (a and cross) else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if (a and cross) else "UpBlock2D" for a in reversed(attention_levels)]
    kwargs = dict(
        sample_size=spec.resolution // (spec.downsample * p),
        in_channels=input_channel_count(spec),
        out_channels=spec.sample_channels * p * p,
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


def _coords(like: torch.Tensor) -> torch.Tensor:
    """x/y in [-1, 1] over the feature map of `like` (any aspect ratio): the UNet knows where "top left" is."""
    batch, _, height, width = like.shape
    ys = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).expand(batch, 2, height, width)


def side_multiple(downsample: int, patch_size: int, levels: int) -> int:
    """Image sides a model takes are multiples of this: a latent model's VAE downsampling x the patch x the halvings
    of a UNet with `levels` levels."""
    return downsample * patch_size * 2 ** (levels - 1)


def size_multiple(spec: ModelSpec, unet) -> int:
    """side_multiple of a built model."""
    return side_multiple(spec.downsample, spec.patch_size, len(unet.config.block_out_channels))


def extend_condition_channels(unet, spec: ModelSpec, condition_channels: int):
    """A model that also takes a condition image: conv_in gets zero-initialised input channels for it, so the
    extended model computes exactly what the original did (the way diffusers' InstructPix2Pix script extends
    Stable Diffusion). Returns (unet, spec); the unet is changed in place."""
    if spec.condition_channels == condition_channels:
        return unet, spec
    if spec.condition_channels:
        raise ValueError(f"the model already takes {spec.condition_channels} condition channels, not "
                         f"{condition_channels}")
    new_spec = spec.model_copy(update={"condition_channels": condition_channels})
    old = unet.conv_in
    conv = torch.nn.Conv2d(input_channel_count(new_spec), old.out_channels, old.kernel_size, old.stride, old.padding,
                           device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, : old.in_channels].copy_(old.weight)
        conv.bias.copy_(old.bias)
    unet.conv_in = conv
    unet.register_to_config(in_channels=conv.in_channels)
    return unet, new_spec


def null_condition(spec: ModelSpec, like: torch.Tensor) -> torch.Tensor:
    """The dropped condition image: all zeros (mid-grey in [-1, 1]), unlike any doodle's black on white."""
    return torch.zeros(like.shape[0], spec.condition_channels, *like.shape[2:], device=like.device, dtype=like.dtype)


def denoise(unet, spec: ModelSpec, x_t: torch.Tensor, t: torch.Tensor, ctx: ContextBatch,
            cond: torch.Tensor | None = None) -> torch.Tensor:
    """The network's prediction (epsilon or v, per the scheduler config) for noisy samples x_t (images, or latents of
    a latent model) at timesteps t. `cond` is the condition image in [-1, 1] (a latent model: its scaled latents;
    None: dropped) for a model with condition channels."""
    p = spec.patch_size
    h = F.pixel_unshuffle(x_t, p) if p > 1 else x_t
    if spec.coord_channels:
        h = torch.cat([h, _coords(h)], dim=1)
    if spec.condition_channels:
        c = null_condition(spec, x_t) if cond is None else cond.to(x_t.dtype)
        h = torch.cat([h, F.pixel_unshuffle(c, p) if p > 1 else c], dim=1)
    elif cond is not None:
        raise UserError("this model was trained without a condition image; leave out the doodle (or train a "
                        "model with context.image_condition)")
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
