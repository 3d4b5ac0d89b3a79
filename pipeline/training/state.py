"""What a training run carries from step to step, and how it is checkpointed and restored exactly: the weights, the
optimizer and learning-rate schedule, the EMA and every random stream. Shared by `diffuse train` and `diffuse
train-vae` (pipeline/training/loop.py, vae_loop.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from pipeline.errors import TrainingDiverged
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    generator: torch.Generator  # the training's own randomness (timesteps, noise, dropout, posterior samples)
    weights_name: str = "unet"  # checkpoint file of the trained weights

    def update(self, grad_clip: float) -> float:
        """Clip, step the optimizer and the schedule, update the EMA; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip).item()
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        return grad_norm

    def save(self, run_dir: Path, step: int, keep_last: int, **extra) -> Path:
        """A checkpoint of everything a bit-identical resume needs (`extra`: more plain values for the record)."""
        state = {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                 "ema": {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"},
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step, **extra}
        names = [k for k, _ in self.model.named_parameters()]
        ema_sd = {k: p.detach().cpu() for k, p in zip(names, self.ema.shadow_params, strict=True)}
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_checkpoint(run_dir, step, weights, ema_sd, state, keep_last, self.weights_name)

    def restore(self, checkpoint: Path, device) -> int:
        """Load a checkpoint written by `save`; returns its step."""
        weights, ema_sd, state = load_checkpoint(checkpoint, self.weights_name)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        names = [k for k, _ in self.model.named_parameters()]
        self.ema.load_state_dict(state["ema"] | {"shadow_params": [ema_sd[k].to(device) for k in names]})
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])


def check_finite(loss: float, step: int, last_good: Path | None, advice: str) -> None:
    """A NaN or infinite loss stops the training with what is intact and what to change."""
    if not math.isfinite(loss):
        where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written"
        raise TrainingDiverged(f"loss became {loss} at step {step + 1}; training stopped and {where}. {advice}")
