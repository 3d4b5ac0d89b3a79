"""The training stream: which items every step trains on, read ahead by a torch DataLoader.

The stream is a fresh seeded permutation per epoch, so any position in it can be reproduced: a resumed run sees
exactly the batches it would have seen. Under DDP (pipeline/training/distributed.py) every rank walks the same
stream and keeps its share of each global batch (`part`), so it reads only its own slice of the shards.

When the items come in several image sizes (aspect-ratio buckets: the dataset's `bucket_groups()`), every batch
is drawn from one bucket instead (`BucketBatches`): per epoch each bucket's items are permuted, wrapped around to
whole batches and cut, and the epoch's batches shuffled; batch k of that stream is the one at sample position
k * batch_size.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.data.loader import ShardImages
from pipeline.training.distributed import WHOLE, Part


class _BatchStream(torch.utils.data.Sampler):
    """Index batches of the training stream from sample position `start` on, forever; with bucket `groups`,
    from batch start // batch_size of the bucketed stream on. Under DDP each rank keeps its share of every
    global batch (`part`), so it reads only its own slice of the shards."""

    def __init__(self, n: int, seed: int, start: int, batch_size: int, part: Part = WHOLE,
                 groups: list[np.ndarray] | None = None):
        self.n, self.seed, self.start, self.batch_size, self.part = n, seed, start, batch_size, part
        self.buckets = BucketBatches(groups, seed, batch_size) if groups else None

    def __iter__(self):
        for batch in self._plain() if self.buckets is None else self._bucketed():
            yield self.part.take(batch).tolist()

    def _plain(self):
        pos = self.start
        while True:
            yield batch_indices(self.n, self.seed, pos, self.batch_size)
            pos += self.batch_size

    def _bucketed(self):
        k = self.start // self.batch_size
        while True:
            yield self.buckets.batch(k)
            k += 1


class BucketBatches:
    """The bucketed training stream: batches of `size` positions, each from one group (bucket) of `groups`.
    Epoch e permutes each group (seeded by seed, e and the group), wraps it around to a whole number of batches
    (a group smaller than a batch still trains; every item is seen every epoch), cuts it into batches and
    shuffles all the epoch's batches (seeded by seed and e). Batch k is a pure function of k: resumable."""

    def __init__(self, groups: list[np.ndarray], seed: int, size: int):
        self.groups = [torch.as_tensor(np.asarray(g, dtype=np.int64)) for g in groups]
        self.seed, self.size = seed, size
        self.per_epoch = sum(-(-len(g) // size) for g in self.groups)
        self._epoch, self._batches = -1, torch.empty(0)

    def batch(self, k: int) -> torch.Tensor:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[j]

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        batches = []
        for bucket, group in enumerate(self.groups):
            perm = group[torch.randperm(len(group), generator=_generator(self.seed, epoch, bucket))]
            wrapped = perm[torch.arange(-(-len(perm) // self.size) * self.size) % len(perm)]
            batches.append(wrapped.view(-1, self.size))
        batches = torch.cat(batches)
        return batches[torch.randperm(len(batches), generator=_generator(self.seed, epoch))]


def _generator(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of ints (distinct tuples: independent streams)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _as_batch(batch):
    return batch  # __getitems__ already returns (indices, images, condition images or None)


def batch_loader(images: ShardImages, seed: int, start: int, batch_size: int, workers: int, pin_memory: bool,
                 part: Part = WHOLE):
    """An endless iterator of (indices, uint8 images, uint8 condition images or None) following
    `batch_indices`, or `BucketBatches` when `images.bucket_groups()` groups the items by size, so a resumed run
    sees the same batches. Worker processes read the shards ahead of the training step. `batch_size` is the
    global batch."""
    groups = images.bucket_groups() if hasattr(images, "bucket_groups") else None  # without it: one size
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=_BatchStream(len(images), seed, start, batch_size, part, groups),
        collate_fn=_as_batch, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
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
