"""Step-indexed sample grids during training: the current EMA weights sample a fixed prompt set with fixed seeds,
so grids from different steps are comparable. Called from the training loop every `tracking.sample_every`
steps when a tracking logger is attached.

The EMA weights are swapped in and the training weights restored bit for bit, and sampling draws only from
its own per-seed generators: the training's random streams are untouched, so a resumed run stays identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.images import grid
from pipeline.model.folder import LoadedModel
from pipeline.model.sampling import generate

GRID_SIZE = 8


def grid_prompts(cfg: Config, captions: list[str]) -> list[str]:
    """The configured prompts, else GRID_SIZE training captions spread evenly over the sorted unique ones."""
    if cfg.tracking.sample_prompts:
        return list(cfg.tracking.sample_prompts)
    unique = sorted(set(captions) - {""})
    if len(unique) <= GRID_SIZE:
        return unique or [""]
    return [unique[round(i * (len(unique) - 1) / (GRID_SIZE - 1))] for i in range(GRID_SIZE)]


def log_sample_grid(cfg: Config, step: int, unet, ema, scheduler, spec, captions: list[str], logger,
                    vae=None) -> Path:
    """Sample the grid prompts with the EMA weights, save RUN_DIR/samples/step-NNNNNNN.png, log it at `step`."""
    prompts = grid_prompts(cfg, captions)
    was_training = unet.training
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        device = next(unet.parameters()).device
        model = LoadedModel(unet, dict(scheduler.config), spec, Path(cfg.run_dir), vae)
        images = generate(model, prompts, list(range(len(prompts))), steps=cfg.tracking.sample_steps,
                          autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    finally:
        ema.restore(unet.parameters())
        unet.train(was_training)
    out = Path(cfg.run_dir) / "samples" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, cols=min(len(prompts), GRID_SIZE)).save(out)
    (out.parent / "grid_prompts.txt").write_text("\n".join(prompts) + "\n")
    logger.log_image(out, step)
    return out
