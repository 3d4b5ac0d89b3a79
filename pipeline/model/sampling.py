"""Sampling through diffusers schedulers: txt2img and img2img, batched classifier-free guidance, and for a model
with a condition image (a doodle) separate text and image guidance scales, as in InstructPix2Pix. A latent model
samples in its VAE's latent space: init and condition images are encoded, the result is decoded."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from pipeline.config import SAMPLERS, SAMPLING
from pipeline.errors import UserError
from pipeline.images import to_uint8
from pipeline.model.encoders import ContextBatch, build_encoder, standardize
from pipeline.model.folder import LoadedModel
from pipeline.model.network import ModelSpec, denoise, size_multiple
from pipeline.model.vae import decode, encode

log = logging.getLogger(__name__)



def make_sampler(name: str, train_scheduler_config: dict):
    classes = {"dpmpp": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise UserError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return classes[name].from_config(train_scheduler_config)


@functools.lru_cache(maxsize=4)
def _encoder(kind: str, max_length: int, clip_path: str | None, categories: tuple[str, ...] | None):
    return build_encoder(kind, max_length, Path(clip_path) if clip_path else None, list(categories or []))


def encoder_for(spec: ModelSpec):
    return _encoder(spec.encoder, spec.max_length, str(spec.clip_path) if spec.clip_path else None,
                    tuple(spec.categories) if spec.categories else None)


def encode_prompts(spec: ModelSpec, prompts: list[str]) -> ContextBatch:
    """Context for prompts; an over-long prompt is truncated with a warning, an empty one is unconditional."""
    enc = encoder_for(spec)
    for i, p in enumerate(prompts):
        if enc.overlong(p):
            log.warning("prompt %d is longer than the encoder's %d tokens and was truncated: %.60s...",
                        i, spec.max_length, p)
    return standardize(enc.encode(list(prompts)), spec.context_stats)


@torch.no_grad()
def generate(model: LoadedModel, prompts: list[str], seeds: list[int], *, sampler: str = SAMPLING.sampler,
             steps: int = SAMPLING.steps, guidance: float = SAMPLING.guidance,
             negative_prompts: list[str] | None = None, init_images: torch.Tensor | None = None,
             strength: float = 1.0, batch_size: int = 64,
             autocast_dtype: torch.dtype | None = None, cond_images: torch.Tensor | None = None,
             image_guidance: float = 1.0, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) uint8 for N prompts, H x W the model's resolution unless `width`/`height` say otherwise.
    Each image's noise comes from its own seed, so an image does not depend on which batch it was generated in.
    init_images (N, 3, H, W) in [-1, 1] turn on img2img: the init image is noised to `strength` (0 keeps it, 1
    ignores it) and denoised from there. cond_images (N, 3, H, W) in [-1, 1] are the condition images (doodles) of a
    model trained with them; text guidance `guidance` and image guidance `image_guidance` then weigh the prompt and
    the doodle separately."""
    if len(seeds) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be between 0 and 1, got {strength}")
    if not 1 <= steps <= 1000:
        raise UserError(f"steps must be between 1 and 1000, got {steps}")
    if not 0.0 <= guidance <= 50.0:
        raise UserError(f"guidance must be between 0 and 50, got {guidance}")
    if not 0.0 <= image_guidance <= 50.0:
        raise UserError(f"image guidance must be between 0 and 50, got {image_guidance}")
    if cond_images is not None and not model.spec.condition_channels:
        raise UserError(f"{model.path} was trained without a condition image, so it cannot follow a doodle: train "
                        "one with context.image_condition (configs/shapes_doodle.yaml), or use an init image "
                        "(img2img) instead")
    size = check_size(model, width, height)
    for name, images in (("init image", init_images), ("doodle", cond_images)):
        if images is not None and tuple(images.shape[-2:]) != size:
            raise UserError(f"{name} is {images.shape[-1]}x{images.shape[-2]}, the images are {size[1]}x{size[0]}")
    out = []
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        init = None if init_images is None else init_images[sl]
        negs = None if negative_prompts is None else negative_prompts[sl]
        cond = None if cond_images is None else cond_images[sl]
        out.append(_generate_batch(model, prompts[sl], seeds[sl], sampler, steps, guidance, negs, init,
                                   strength, autocast_dtype, cond, image_guidance, size))
    return torch.cat(out)


def check_size(model: LoadedModel, width: int | None, height: int | None) -> tuple[int, int]:
    """(height, width) of the images to make: the model's resolution by default; a UserError for a size the model
    cannot make (sides must map onto whole UNet levels, latents and patches)."""
    res = model.spec.resolution
    height, width = height or res, width or res
    multiple = size_multiple(model.spec, model.unet)
    if height % multiple or width % multiple or min(height, width) < multiple:
        raise UserError(f"{width}x{height}: this model makes images whose sides are multiples of {multiple} "
                        f"(trained at {res}x{res})")
    return height, width


def _guidance_branches(text_ctx, null_ctx, cond, guidance: float, image_guidance: float):
    """The (context, condition image) pairs one batched forward evaluates: (text, image) always, (null text,
    image) for text guidance, (null text, null image) for image guidance. Without a condition image this is
    plain classifier-free guidance: (text, -) and (null text, -)."""
    if cond is None:
        return [(text_ctx, None)] + ([(null_ctx, None)] if guidance != 1.0 else [])
    branches = [(text_ctx, cond)]
    if guidance != 1.0 or image_guidance != 1.0:
        branches.append((null_ctx, cond))
    if image_guidance != 1.0:
        branches.append((null_ctx, None))
    return branches


def combine_guidance(preds: list[torch.Tensor], guidance: float, image_guidance: float) -> torch.Tensor:
    """InstructPix2Pix's guidance (Brooks et al. 2023, eq. 3, as in diffusers' pipeline) over the branches of
    _guidance_branches:  e(0,0) + s_I * (e(0,I) - e(0,0)) + s_T * (e(T,I) - e(0,I)).
    With one branch it is e(T,I); with two, classifier-free guidance between them."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        cond, uncond = preds
        return uncond + guidance * (cond - uncond)
    both, image_only, neither = preds
    return neither + image_guidance * (image_only - neither) + guidance * (both - image_only)


def _generate_batch(model, prompts, seeds, sampler, steps, guidance, negative_prompts, init, strength,
                    autocast_dtype, cond, image_guidance, size):
    spec, unet = model.spec, model.unet
    device = next(unet.parameters()).device
    height, width = size[0] // spec.downsample, size[1] // spec.downsample  # of what is denoised
    sched = make_sampler(sampler, model.scheduler_config)
    sched.set_timesteps(steps, device=device)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(spec.sample_channels, height, width, generator=g) for g in gens]).to(device)
    text_ctx = encode_prompts(spec, prompts)
    null_ctx = encode_prompts(spec, negative_prompts or [""] * len(prompts))
    if cond is not None:
        cond = cond.to(device)
        if spec.vae:  # a latent model takes its condition image as latents, as it was trained
            cond = encode(model.vae, spec.vae, cond)
    branches = _guidance_branches(text_ctx, null_ctx, cond, guidance, image_guidance)
    ctx = functools.reduce(ContextBatch.cat, [c for c, _ in branches])
    ctx = ContextBatch(*[None if a is None else a.to(device) for a in ctx.astuple()])
    cond_in = None
    if spec.condition_channels:  # a dropped (or absent) condition image is the null condition
        cond_in = torch.cat([torch.zeros_like(noise) if c is None else c for _, c in branches])

    timesteps = sched.timesteps
    if init is None:
        x = noise * sched.init_noise_sigma
    else:
        init = init.to(device)
        t_start = steps - min(int(round(steps * strength)), steps)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        if len(timesteps) == 0:
            return to_uint8(init).cpu()
        if spec.vae:  # img2img in latent space: the init image's latents are noised
            init = encode(model.vae, spec.vae, init)
        x = sched.add_noise(init, noise, timesteps[:1].repeat(len(prompts)))

    for t in timesteps:
        x_in = torch.cat([x] * len(branches))
        x_in = sched.scale_model_input(x_in, t)
        tt = t.expand(x_in.shape[0]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = denoise(unet, spec, x_in, tt, ctx, cond_in).float()
        pred = combine_guidance(list(pred.chunk(len(branches))), guidance, image_guidance)
        x = sched.step(pred, t, x, generator=gens, return_dict=False)[0]
    if spec.vae:
        x = decode(model.vae, spec.vae, x)
    return to_uint8(x).cpu()
