"""Data-parallel training over several processes (DDP), started by torchrun:

    torchrun --nproc_per_node 4 -m pipeline.cli train --config CONFIG          one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pipeline.cli train --config CONFIG                                   two machines (run on each)

`train.batch_size` stays the *global* batch. Every rank walks the same deterministic sample stream
(pipeline/training/batches.py) and keeps rows rank*b .. (rank+1)*b of each global batch (b = batch / world).
Random numbers (timesteps, noise, CFG dropout, flips) are drawn for the whole global batch from the shared,
identically seeded generator before a rank keeps its rows, so every rank's generator stays in step and a run
computes the same thing for any world size, up to the summation order of the gradient all-reduce. The stream
position is global too, so a checkpoint written by N processes resumes under M.

Rank 0 alone logs, samples grids and writes checkpoints and the model; the other ranks wait for it.
A plain `diffuse train` (no torchrun, or a world size of 1) never touches torch.distributed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import UserError

# Rank 0 may ingest a raw imagefolder or encode captions while the others wait at a barrier: give it time.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


def is_main_process() -> bool:
    """True outside torchrun and on global rank 0 (for code that runs before `setup`, e.g. the CLI)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Part:
    """This process's share of every global batch, and the collectives the training loop needs.
    The default (rank 0 of 1) is the single-process run: every method is then a no-op or an identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, x):
        """This rank's rows of a tensor (or list) that holds a whole global batch along dim 0."""
        if self.world == 1:
            return x
        b = len(x) // self.world
        return x[self.rank * b : (self.rank + 1) * b]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's value of `obj` on every rank (a sync point: the others wait until rank 0 gets here)."""
        if self.world == 1:
            return obj

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> float:
        """The average of a scalar over all ranks (the global batch's loss), the same number on every rank."""
        if self.world == 1:
            return value.item()

        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return total.item() / self.world

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. filling a disk cache), then the others (which find it filled)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


WHOLE = Part()


def setup(batch_sizes: dict[str, int]) -> Part:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): NCCL on GPUs, gloo on CPU. Without torchrun: the single-process Part.
    `batch_sizes` (config key -> global batch size) must each split evenly over the processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return WHOLE
    part = Part(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    for name, batch_size in batch_sizes.items():
        if batch_size % world:
            raise UserError(f"{name} ({batch_size}) must be divisible by the number of processes ({world}): "
                            f"each takes {batch_size} / {world} samples of every global batch. Change one of them.")

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(part.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
        atexit.register(_teardown)
    return part


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(part: Part) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", part.local_rank) if part.world > 1 else torch.device("cuda")


def wrap(model: torch.nn.Module, part: Part) -> torch.nn.Module:
    """DDP around the model when there are several ranks (gradients averaged in the backward pass)."""
    if part.world == 1:
        return model

    ids = [part.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=ids)


def accumulating(model: torch.nn.Module, last_micro_batch: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a gradient-accumulation step."""
    if last_micro_batch or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def checkpoint_visible(part: Part, path):
    """Every rank loads the checkpoint rank 0 chose; a rank that cannot see it gets a clear error."""
    path = part.from_main(path)
    if path is not None and not path.is_dir():
        raise UserError(f"rank {part.rank} cannot see checkpoint {path} that rank 0 resumes from: run_dir must be "
                        "on storage every node shares (e.g. a ReadWriteMany volume)")
    return path
