"""The training stream: which items every step trains on, read ahead by a torch DataLoader.

The stream is a fresh seeded permutation per epoch, so any position in it can be reproduced: a resumed run sees
exactly the batches it would have seen. Under DDP (pipeline/training/distributed.py) every rank walks the same
stream and keeps its share of each global batch (`part`), so it reads only its own slice of the shards.
"""

from __future__ import annotations

import torch

from pipeline.data.loader import ShardImages
from pipeline.training.distributed import WHOLE, Part


class _BatchStream(torch.utils.data.Sampler):
    """Index batches of the training stream from sample position `start` on, forever. Under DDP each rank
    keeps its share of every global batch (`part`), so it reads only its own slice of the shards."""

    def __init__(self, n: int, seed: int, start: int, batch_size: int, part: Part = WHOLE):
        self.n, self.seed, self.start, self.batch_size, self.part = n, seed, start, batch_size, part

    def __iter__(self):
        pos = self.start
        while True:
            yield self.part.take(batch_indices(self.n, self.seed, pos, self.batch_size)).tolist()
            pos += self.batch_size


def _as_batch(batch):
    return batch  # __getitems__ already returns (indices, images, condition images or None)


def batch_loader(images: ShardImages, seed: int, start: int, batch_size: int, workers: int, pin_memory: bool,
                 part: Part = WHOLE):
    """An endless iterator of (indices, uint8 images) following `batch_indices`, so a resumed run sees the same
    batches. Worker processes read the shards ahead of the training step. `batch_size` is the global batch."""
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=_BatchStream(len(images), seed, start, batch_size, part), collate_fn=_as_batch,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
    return iter(loader)


def flip_mask(n: int, seed: int, position: int, part: Part = WHOLE) -> torch.Tensor:
    """Which of this rank's n samples are mirrored (probability 1/2), decided by (seed, stream position):
    reproducible. `position` is the global batch's; under DDP n is this rank's share of it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + position + 1)
    return part.take(torch.rand(n * part.world, generator=g)) < 0.5


def random_flip(x: torch.Tensor, seed: int, position: int, part: Part = WHOLE) -> torch.Tensor:
    """Mirror each image left-right per flip_mask."""
    flip = flip_mask(x.shape[0], seed, position, part).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def batch_indices(n: int, seed: int, start: int, size: int) -> torch.Tensor:
    """Items for the samples start..start+size of the training stream: a fresh permutation each epoch,
    seeded by (seed, epoch), so any position in the stream can be reproduced after a resume."""
    out = []
    pos = start
    while len(out) < size:
        epoch, offset = divmod(pos, n)
        perm = _perm(n, seed, epoch)
        take = min(size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=g)
    return _PERM_CACHE[key]
