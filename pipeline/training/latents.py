"""Latents cached once: the items of a prepared dataset encoded by a latent model's VAE, memory-mapped for training.

    DATASET.latents/                   beside the prepared dataset (data.latent_cache overrides)
        <VAE sha256, 16 hex>/          one folder per VAE content: another VAE never sees these latents
            vae.json                   the VaeSpec of that VAE
            keys-<version>-<V>.npy     memo: the entry key of every manifest row's image (and condition image)
            part-....npy               (n, V, 2, C, h, w) float16: posterior mean and std of n entries
            part-....keys.npy          (n,) their keys; written last, so a part without it does not count

An entry is keyed by the bytes and shape of the prepared pixels it encodes and by V (1, or 2 with the left-right
mirror image, data.random_flip), so a changed image, resolution, bucket or flip setting encodes exactly what changed
and an unchanged run encodes nothing; training draws z = mean + std * noise from the stored posterior each step, as
diffusers' and kohya's scripts do with the VAE online. Parts are written atomically chunk by chunk: a killed
encoding resumes where it stopped. Under torchrun every rank encodes its share of what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import Config
from pipeline.data.loader import TrainingData
from pipeline.data.prepared import PreparedDataset, is_prepared
from pipeline.images import arrays_to_tensor
from pipeline.model.vae import VaeSpec, posterior
from pipeline.training.distributed import WHOLE, Part

log = logging.getLogger(__name__)
KEY_BYTES = 32  # hex characters of an entry key
CHUNK = 512  # images encoded and written per part


def cache_root(data_cfg) -> Path:
    """Where the latents of `data_cfg.path` live: data.latent_cache, else DATASET.latents beside a prepared dataset
    (outside the folder DVC versions as a whole), else beside the ingest cache of a raw imagefolder under its own
    name, so every ingested version of the folder shares one cache."""
    if data_cfg.latent_cache is not None:
        return Path(data_cfg.latent_cache)
    src = Path(data_cfg.path)
    if is_prepared(src):
        return src.with_name(src.name + ".latents")
    return Path(data_cfg.prepared_cache) / f"{src.name}.latents"


def entry_key(pixels: np.ndarray, variants: int) -> bytes:
    h = hashlib.sha256(f"v1 {variants} {pixels.shape}".encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()[:KEY_BYTES].encode()


def _chunks(ds: PreparedDataset, rows: np.ndarray, conditions: bool):
    """(rows, their images or condition images) of `rows`, CHUNK at a time, each chunk one image size."""
    for at in ds.size_groups(rows):
        for i in range(0, len(at), CHUNK):
            chunk = rows[at[i:i + CHUNK]]
            yield chunk, ds.conditions(chunk) if conditions else ds.images(chunk)


def _row_keys(ds: PreparedDataset, variants: int, conditions: bool) -> np.ndarray:
    """The entry key of every manifest row's image (or condition image)."""
    keys = np.empty(len(ds.manifest), dtype=f"S{KEY_BYTES}")
    for chunk, pixels in _chunks(ds, np.arange(len(ds.manifest)), conditions):
        keys[chunk] = [entry_key(p, variants) for p in pixels]
    return keys


@dataclass
class LatentCache:
    """The entries of one VAE folder: key -> (part, row), parts memory-mapped on first use (in each process)."""

    folder: Path
    index: dict[bytes, tuple[int, int]]
    parts: list[Path]

    @classmethod
    def open(cls, folder: Path) -> LatentCache:
        index: dict[bytes, tuple[int, int]] = {}
        parts = []
        for keys_file in sorted(folder.glob("part-*.keys.npy")):
            data = keys_file.with_name(keys_file.name.removesuffix(".keys.npy") + ".npy")
            if not data.is_file():
                continue
            for row, key in enumerate(np.load(keys_file).tolist()):
                index.setdefault(key, (len(parts), row))
            parts.append(data)
        return cls(folder, index, parts)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def __getstate__(self):  # DataLoader workers open their own memory maps
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def _array(self, part: int) -> np.ndarray:
        arrays = self.__dict__.setdefault("_arrays", {})
        if part not in arrays:
            arrays[part] = np.load(self.parts[part], mmap_mode="r")
        return arrays[part]

    def gather(self, keys) -> np.ndarray:
        """(len(keys), V, 2, C, h, w) float32 for entries of one shape."""
        return np.stack([self._array(part)[row] for part, row in map(self.index.__getitem__, keys)]).astype(
            np.float32)

    def shape_code(self, key: bytes) -> int:
        """The entry's latent (h, w), as one number."""
        h, w = self._array(self.index[key][0]).shape[-2:]
        return h * 100_000 + w


class LatentItems(torch.utils.data.Dataset):
    """The train split as cached latents, fetched a batch at a time: (positions, posterior (B, V, 2, C, h, w), the
    condition images' posterior or None). Same interface as ShardImages for the batch stream."""

    def __init__(self, cache: LatentCache, keys: np.ndarray, condition_keys: np.ndarray | None):
        self.cache, self.keys, self.condition_keys = cache, keys, condition_keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, idx: list[int]):
        idx_array = np.asarray(idx)
        latents = torch.from_numpy(self.cache.gather(self.keys[idx_array].tolist()))
        cond = None
        if self.condition_keys is not None:
            cond = torch.from_numpy(self.cache.gather(self.condition_keys[idx_array].tolist()))
        return torch.as_tensor(idx), latents, cond

    def bucket_groups(self) -> list[np.ndarray] | None:
        """Positions grouped by latent shape (aspect-ratio buckets); None when all share one."""
        shapes = np.array([self.cache.shape_code(k) for k in self.keys.tolist()])
        codes = np.unique(shapes)
        return None if len(codes) == 1 else [np.flatnonzero(shapes == c) for c in codes]


@dataclass
class EncodeResult:
    items: LatentItems
    encoded: int  # entries encoded by this call (all ranks); 0 when the cache already held everything
    folder: Path


def ensure_latents(ds: PreparedDataset, rows: np.ndarray, vae, spec: VaeSpec, root: Path, *, flip: bool,
                   conditions: bool, batch_size: int = 32, part: Part = WHOLE,
                   progress: bool = True) -> EncodeResult:
    """The latents of manifest rows `rows` (and of their condition images), encoding only what the cache lacks."""
    variants = 2 if flip else 1
    folder = Path(root) / spec.sha256[:16]
    with part.main_first():  # rank 0 computes the per-version key memo; the others read it
        folder.mkdir(parents=True, exist_ok=True)
        if part.is_main:
            (folder / "vae.json").write_text(spec.model_dump_json(indent=2))
        keys = _memo_keys(ds, folder, variants, conditions=False)
        condition_keys = _memo_keys(ds, folder, variants, conditions=True) if conditions else None
    cache = LatentCache.open(folder)
    todo = {False: _missing(rows, keys, cache)}
    if condition_keys is not None:
        todo[True] = _missing(rows, condition_keys, cache)
    total = part.from_main(sum(len(r) for r in todo.values()))
    if total:
        log.info("latents: encoding %d of %d images with the VAE (%s); the rest are cached in %s", total,
                 len(rows) * len(todo), spec.source, folder)
        mine = {is_condition: missing[part.rank::part.world] for is_condition, missing in todo.items()}
        bar = tqdm(total=sum(len(r) for r in mine.values()), desc="encode latents", unit="img",
                   disable=not (progress and part.is_main), dynamic_ncols=True)
        for is_condition, missing in mine.items():
            entry_keys = condition_keys if is_condition else keys
            for chunk, pixels in _chunks(ds, missing, is_condition):
                _write_part(folder, entry_keys[chunk].tolist(), _posteriors(vae, pixels, variants, batch_size), part)
                bar.update(len(chunk))
        bar.close()
        part.barrier()
        cache = LatentCache.open(folder)
    items = LatentItems(cache, keys[rows], None if condition_keys is None else condition_keys[rows])
    return EncodeResult(items, total, folder)


def latents_for(cfg: Config, data: TrainingData, vae, spec: VaeSpec, part: Part = WHOLE,
                progress: bool = True) -> EncodeResult:
    """The latents of a latent model's training data as its config asks for them: the train split, mirror views
    with data.random_flip, condition images with context.image_condition, in the cache of cache_root."""
    return ensure_latents(data.dataset, data.images.rows, vae, spec, cache_root(cfg.data), flip=cfg.data.random_flip,
                          conditions=cfg.context.image_condition, batch_size=cfg.train.encode_batch_size, part=part,
                          progress=progress)


def _memo_keys(ds: PreparedDataset, folder: Path, variants: int, conditions: bool) -> np.ndarray:
    """Entry keys of every manifest row, computed once per dataset version (reading every image once)."""
    memo = folder / f"keys-{ds.version[:16]}-{variants}{'-conditions' if conditions else ''}.npy"
    if memo.is_file():
        keys = np.load(memo)
        if len(keys) == len(ds.manifest):
            return keys
    keys = _row_keys(ds, variants, conditions)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.npy")
    np.save(tmp, keys)
    os.replace(tmp, memo)
    return keys


def _missing(rows: np.ndarray, keys: np.ndarray, cache: LatentCache) -> np.ndarray:
    """One row per key the cache lacks (rows with the same pixels share an entry)."""
    seen: set[bytes] = set()
    out = []
    for r in rows.tolist():
        k = bytes(keys[r])
        if k not in cache and k not in seen:
            seen.add(k)
            out.append(r)
    return np.array(out, dtype=np.int64)


def _posteriors(vae, pixels: np.ndarray, variants: int, batch_size: int) -> np.ndarray:
    """(n, V, 2, C, h, w) float16 posterior mean and std of uint8 (n, H, W, 3) images (V = 2: the mirror too)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        x = arrays_to_tensor(pixels[i:i + batch_size])
        views = [x, x.flip(-1)][:variants]
        stats = [torch.stack(posterior(vae, v), dim=1).float().cpu() for v in views]  # (b, 2, C, h, w) each
        out.append(torch.stack(stats, dim=1).half().numpy())
    return np.concatenate(out)


def _write_part(folder: Path, keys: list[bytes], latents: np.ndarray, part: Part) -> None:
    """One part, atomically: the data first, then its keys (which make it count)."""
    name = f"part-{time.time_ns():020d}-{os.getpid()}-r{part.rank}"
    data, key_file = folder / f"{name}.npy", folder / f"{name}.keys.npy"
    for final, array in ((data, latents), (key_file, np.array(keys, dtype=f"S{KEY_BYTES}"))):
        tmp = final.with_name(f".{final.name}.tmp.npy")
        np.save(tmp, array)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
