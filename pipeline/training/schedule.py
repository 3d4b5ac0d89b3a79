"""The training schedule: learning-rate cycles (`train.cycles`) and what each step trains with.

One cycle (the default) is a linear warmup and a cosine decay to 0 over `train.max_steps`. Each further cycle is a
warm restart: a new warmup and cosine at `lr * lr_scale`, with fresh optimizer moments and a fresh EMA, like a
fine-tune of the weights the cycle before left. A cycle may train at its own batch size and image side (the images
area-downsampled: a cheaper first cycle at a lower resolution, the convolutional UNet goes on at full size). The
sample stream runs on across cycles, so `samples_before` places any step in it, for resume and for the data order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import TrainConfig


@dataclass(frozen=True)
class Cycle:
    start: int  # first step (0-based)
    steps: int
    lr_scale: float
    warmup_steps: int
    batch_size: int  # the global batch, per micro-batch
    resolution: int  # image side the steps train at

    @property
    def end(self) -> int:
        return self.start + self.steps


class Schedule:
    def __init__(self, train: TrainConfig, data_resolution: int):
        self.grad_accum = train.grad_accum
        cycles, start = [], 0
        for c in train.cycles or [None]:
            steps = train.max_steps if c is None else c.steps
            cycles.append(Cycle(
                start=start, steps=steps, lr_scale=1.0 if c is None else c.lr_scale,
                warmup_steps=train.warmup_steps if c is None or c.warmup_steps is None else c.warmup_steps,
                batch_size=train.batch_size if c is None or c.batch_size is None else c.batch_size,
                resolution=data_resolution if c is None or c.resolution is None else c.resolution))
            start += steps
        self.cycles: tuple[Cycle, ...] = tuple(cycles)
        self.total_steps = start

    def cycle_at(self, step: int) -> Cycle:
        """The cycle step `step` (0-based) belongs to; steps past the end belong to the last one."""
        return next((c for c in self.cycles if step < c.end), self.cycles[-1])

    def restarts_at(self, step: int) -> bool:
        """Whether a later cycle starts at `step`: fresh optimizer moments and EMA there."""
        return step > 0 and any(c.start == step for c in self.cycles)

    def batch_size_at(self, step: int) -> int:
        return self.cycle_at(step).batch_size

    def resolution_at(self, step: int) -> int:
        return self.cycle_at(step).resolution

    def resolution_after(self, steps_done: int) -> int:
        """The side the weights after `steps_done` steps last trained at: a checkpoint's or a sample grid's."""
        return self.resolution_at(steps_done - 1)

    def samples_before(self, step: int) -> int:
        """Position in the training stream where step `step` starts: the samples of all steps before it."""
        return sum(min(max(step - c.start, 0), c.steps) * c.batch_size for c in self.cycles) * self.grad_accum

    def lr_factor(self, step: int) -> float:
        """The learning rate of step `step` as a fraction of train.lr."""
        c = self.cycle_at(step)
        k = step - c.start
        if k < c.warmup_steps:
            shape = (k + 1) / c.warmup_steps
        else:
            progress = (k - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
            shape = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return c.lr_scale * shape
