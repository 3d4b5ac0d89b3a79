"""A prepared dataset version: what `diffuse data ingest` writes and everything downstream reads.

    data/prepared/NAME/
        shards/shard-00000.npy    (n, R, R, 3) uint8; memory-mapped on load, no per-image decoding
        conditions/shard-00000.npy  optional: each item's condition image (a doodle, a sketch), same shards, sizes
                                  and rows as shards/ (row r's condition sits at r's (shard, index)); white where
                                  an item has none. Present only when dataset.json's num_conditions > 0
        manifest.parquet          one row per kept item (columns: MANIFEST_SCHEMA)
        quarantine.jsonl          {"item": ..., "reason": ...} per rejected item
        dataset.json              name, version, resolution, counts (num_conditions: items with a condition)

`version` is the sha256 of the manifest, shard and condition shard bytes: the same data gives the same version.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import UserError

DATA_ROOT_ENV = "DIFFUSE_DATA_ROOT"
DEFAULT_ROOT = Path("data/prepared")
SHARD_PATTERN = "shard-{:05d}.npy"
IMAGES_DIR, CONDITIONS_DIR = "shards", "conditions"


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

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(s) for s in self.shards])

    def images(self, rows) -> np.ndarray:
        """(len(rows), R, R, 3) uint8 for manifest rows `rows` (items are stored in manifest order)."""
        return self._gather(self.shards, rows)

    def conditions(self, rows) -> np.ndarray:
        """(len(rows), R, R, 3) uint8 condition images for manifest rows `rows`, white where an item has none
        (manifest column `condition` null); a UserError when the dataset has no condition images."""
        return self._gather(self.condition_shards, rows)

    def _gather(self, shards: list[np.ndarray], rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.resolution, self.resolution, 3), dtype=np.uint8)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = shards[s][rows[sel] - self._offsets[s]]
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
