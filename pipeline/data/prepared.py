"""A prepared dataset version: what `diffuse data ingest` writes and everything downstream reads.

    data/prepared/NAME/
        shards/shard-00000.npy    (n, H, W, 3) uint8, one image size per shard: (n, R, R, 3) for a square
                                  dataset; memory-mapped on load, no per-image decoding
        conditions/shard-00000.npy  optional: each item's condition image (a doodle, a sketch), same shards, sizes
                                  and rows as shards/ (row r's condition sits at r's (shard, index)); white where
                                  an item has none. Present only when dataset.json's num_conditions > 0
        manifest.parquet          one row per kept item (columns: manifest_schema()); an item's pixels sit at its
                                  (shard, index), not in manifest order
        quarantine.jsonl          {"item": ..., "reason": ...} per rejected item
        dataset.json              name, version, resolution, counts (num_conditions: items with a condition)

A square dataset holds every image centre-cropped to R x R (R = dataset.json's resolution). A bucketed one
(`ingest.buckets`, pipeline/data/buckets.py) holds each image at an aspect-ratio bucket of about R x R pixels:
dataset.json lists the `buckets` ([width, height]) its items use and `items_per_bucket`, and the manifest has
`width` and `height` columns. `images(rows)` reads rows of one size; `by_size` reads any rows a size at a time,
`square_images` at one square size (centre-cropped); `sizes` says each row's.

`version` is the sha256 of the manifest, shard and condition shard bytes: the same data gives the same version.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.images import crop_square, resize_array

DATA_ROOT_ENV = "DIFFUSE_DATA_ROOT"
DEFAULT_ROOT = Path("data/prepared")
SHARD_PATTERN = "shard-{:05d}.npy"
IMAGES_DIR, CONDITIONS_DIR = "shards", "conditions"
SIZE_COLUMNS = ("width", "height")  # manifest columns of bucketed datasets only


def manifest_schema():
    return pa.schema([
        ("id", pa.string()),              # stable: sha256 of (source item, caption), 16 hex
        ("caption", pa.string()),
        ("split", pa.string()),           # "train" or "eval" (a fixed share, chosen by the id's hash)
        ("label", pa.string()),           # class label (--label-column), for category conditioning; else null
        ("source_uri", pa.string()),      # file path, s3:// URI or tar member (archive.tar#key.jpg)
        ("sha256", pa.string()),          # of the source bytes
        ("phash", pa.string()),           # perceptual hash, 16 hex (imagehash.phash)
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("shard", pa.int32()),
        ("index", pa.int32()),            # row inside the shard
        ("width", pa.int32()),            # prepared size (a bucket); bucketed datasets only
        ("height", pa.int32()),
        ("pixel_mean", pa.float32()),     # of the prepared RGB image (a 32x32 thumbnail of it), 0..255
        ("pixel_std", pa.float32()),      # same; near 0: a constant (blank) image
        ("near_duplicate_of", pa.string()),  # id of an earlier kept item with a near-identical image, or null
        ("note", pa.string()),            # what was done to the item (e.g. "animated: first of 3 frames")
        # the item's condition image (conditions/ shards): null = none, "doodle" = derived by the built-in
        # transform (pipeline/data/doodle.py), else the condition file's source URI / label
        ("condition", pa.string()),
    ])


def data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, DEFAULT_ROOT))


def dataset_dir(name_or_path: str | Path) -> Path:
    """A dataset NAME lives in data/prepared/NAME ($DIFFUSE_DATA_ROOT overrides); a path is used as is."""
    s = str(name_or_path)
    if "/" in s or os.sep in s or s.startswith("."):
        return Path(s)
    return data_root() / s


def is_prepared(path: Path) -> bool:
    return (Path(path) / "manifest.parquet").is_file() and (Path(path) / "dataset.json").is_file()


def compute_version(path: Path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    conditions = sorted((path / CONDITIONS_DIR).glob("shard-*.npy"))
    for f in [path / "manifest.parquet", *sorted((path / IMAGES_DIR).glob("shard-*.npy")), *conditions]:
        # image shards hash under their bare name (the versions of datasets without conditions stay as they were)
        h.update((f"{CONDITIONS_DIR}/{f.name}" if f in conditions else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class PreparedDataset:
    path: Path
    info: dict

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def version(self) -> str:
        return self.info["version"]

    @property
    def resolution(self) -> int:
        return int(self.info["resolution"])

    @cached_property
    def manifest(self):
        return pd.read_parquet(self.path / "manifest.parquet")

    @property
    def captions(self) -> list[str]:
        return self.manifest["caption"].tolist()

    @cached_property
    def shards(self) -> list[np.ndarray]:
        return self._load_shards(IMAGES_DIR)

    @property
    def has_conditions(self) -> bool:
        """Whether items carry condition images (conditions/ shards); datasets made before them have none."""
        return int(self.info.get("num_conditions", 0)) > 0

    @cached_property
    def condition_shards(self) -> list[np.ndarray]:
        if not self.has_conditions:
            raise UserError(f"{self.path}: this dataset has no condition images; ingest with --condition-column "
                            "COLUMN (a sketch file per item) or --doodles (derived from each image)")
        return self._load_shards(CONDITIONS_DIR)

    def _load_shards(self, folder: str) -> list[np.ndarray]:
        return [np.load(self.path / folder / SHARD_PATTERN.format(i), mmap_mode="r")
                for i in range(int(self.info["num_shards"]))]

    def __len__(self) -> int:
        return int(self.info["num_items"])

    @property
    def is_bucketed(self) -> bool:
        """Whether images keep their aspect ratio in buckets (`ingest.buckets`) instead of the square crop."""
        return self.info.get("buckets") is not None

    @cached_property
    def _locations(self) -> tuple[np.ndarray, np.ndarray]:
        """Each manifest row's (shard, index): where its pixels are stored."""
        m = self.manifest
        return m["shard"].to_numpy(dtype=np.int64), m["index"].to_numpy(dtype=np.int64)

    @cached_property
    def _shard_sizes(self) -> np.ndarray:
        """(num_shards, 2): the (height, width) of each image shard's images, from the .npy headers (the
        memory maps are not kept: a pickled copy of this object, e.g. for a DataLoader worker, stays small)."""
        return np.array([np.load(self.path / IMAGES_DIR / SHARD_PATTERN.format(i), mmap_mode="r").shape[1:3]
                         for i in range(int(self.info["num_shards"]))], dtype=np.int64).reshape(-1, 2)

    @property
    def sizes(self) -> np.ndarray:
        """(len, 2): each manifest row's (height, width) as stored; all (R, R) in a square dataset."""
        return self._shard_sizes[self._locations[0]]

    def images(self, rows) -> np.ndarray:
        """(len(rows), H, W, 3) uint8 for manifest rows `rows`, which must share one size (H, W): a ValueError
        when they do not (group rows by `sizes`, or read them with `square_images`)."""
        return self._gather(self.shards, rows)

    def conditions(self, rows) -> np.ndarray:
        """(len(rows), H, W, 3) uint8 condition images for manifest rows `rows` (of one size, as `images`),
        white where an item has none (manifest column `condition` null); a UserError when the dataset has no
        condition images."""
        return self._gather(self.condition_shards, rows)

    def square_images(self, rows, side: int) -> np.ndarray:
        """(len(rows), side, side, 3) uint8 for manifest rows `rows` of any sizes: each image centre-cropped to
        a square and resized to side x side (area average down, bilinear up), for code that compares images
        at one square size (evaluation, reports). A square dataset's images at side R are returned as stored."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), side, side, 3), dtype=np.uint8)
        for at, images in self.by_size(rows):
            out[at] = resize_array(crop_square(images), side)
        return out

    def size_groups(self, rows) -> list[np.ndarray]:
        """Positions in manifest rows `rows` grouped by image size, in (height, width) order: one group for a square
        dataset."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        _, group = np.unique(self.sizes[rows], axis=0, return_inverse=True)
        group = group.reshape(-1)
        return [np.flatnonzero(group == g) for g in range(group.max() + 1 if len(group) else 0)]

    def by_size(self, rows) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Manifest rows `rows` of any sizes, a size at a time: (positions in `rows`, their images)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        for at in self.size_groups(rows):
            yield at, self.images(rows[at])

    def _gather(self, shards: list[np.ndarray], rows) -> np.ndarray:
        """The pixels of manifest rows `rows` from `shards`, read shard by shard (no per-row Python work)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        shard, index = (where[rows] for where in self._locations)
        sizes = np.unique(self._shard_sizes[np.unique(shard)], axis=0)
        if len(sizes) > 1:
            raise ValueError(f"{self.path}: these rows hold images of several sizes "
                             f"({', '.join(f'{w}x{h}' for h, w in sizes)}) and cannot share one array: read one "
                             "size at a time (PreparedDataset.sizes) or use square_images")
        height, width = sizes[0] if len(sizes) else (self.resolution, self.resolution)
        out = np.empty((len(rows), height, width, 3), dtype=np.uint8)
        order = np.argsort(shard, kind="stable")
        for at in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
            if len(at):
                out[at] = shards[shard[at[0]]][index[at]]
        return out

    def quarantine(self) -> list[dict]:
        f = self.path / "quarantine.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def open_prepared(name_or_path: str | Path) -> PreparedDataset:
    path = dataset_dir(name_or_path)
    if not is_prepared(path):
        raise UserError(f"{path} is not a prepared dataset (no manifest.parquet/dataset.json). "
                        f"Create it with `diffuse data ingest SRC --name NAME`.")
    try:
        info = json.loads((path / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/dataset.json is unreadable ({e}); re-run `diffuse data ingest`.") from None
    return PreparedDataset(path, info)
