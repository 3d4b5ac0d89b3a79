"""The train split of a dataset, as the trainer (and the evaluation's copy rate) reads it: captions, labels and a
torch Dataset of the images in the prepared shards (pipeline/data/prepared.py), fetched a batch at a time.

`data.path` may also be a raw imagefolder: it is ingested once into a prepared dataset under
`data.prepared_cache` (keyed by its content and the ingest settings), so there is one way images are decoded
and checked. Only rows of the `train` split are used; `eval` rows are held out for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.ingest import ingest
from pipeline.data.prepared import PreparedDataset, is_prepared, open_prepared
from pipeline.errors import UserError

log = logging.getLogger(__name__)


class ShardImages(torch.utils.data.Dataset):
    """Train-split images of a prepared dataset, fetched a batch at a time from memory-mapped shards; with
    `conditions`, each item's condition image too (white for an item that has none). The items of one batch
    must share a size: in a bucketed dataset, one bucket's (`bucket_groups`)."""

    def __init__(self, ds: PreparedDataset, rows: np.ndarray, conditions: bool = False):
        self.ds, self.rows, self.with_conditions = ds, rows, conditions

    def __len__(self) -> int:
        return len(self.rows)

    def bucket_groups(self) -> list[np.ndarray] | None:
        """Positions 0..len-1 of the items grouped by image size (bucket), in size order; None when all items
        share one size. The training stream (pipeline/training/batches.py) draws every batch from one group."""
        groups = self.ds.size_groups(self.rows)
        return groups if len(groups) > 1 else None

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        rows = self.rows[np.asarray(idx)]
        pixels = torch.from_numpy(self.ds.images(rows)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        cond = torch.from_numpy(self.ds.conditions(rows)).permute(0, 3, 1, 2) if self.with_conditions else None
        return torch.as_tensor(idx), pixels, cond


@dataclass
class TrainingData:
    images: ShardImages
    captions: list[str]
    labels: list[str] | None
    dataset: PreparedDataset
    has_condition: torch.Tensor | None = None  # per train item: whether it has a condition image

    @property
    def version(self) -> str:
        return self.dataset.version

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of the train items' images, each size once: (R, R) only for square data."""
        return [(h, w) for h, w in np.unique(self.dataset.sizes[self.images.rows], axis=0).tolist()]


def open_training_data(data_cfg, ingest_cfg, conditions: bool = False) -> TrainingData:
    """The train split of `data_cfg.path`; with `conditions`, its condition images too (context.image_condition)."""
    path = Path(data_cfg.path)
    if not is_prepared(path):
        path = _ingest_cached(data_cfg, ingest_cfg)
    ds = open_prepared(path)
    if ds.resolution != data_cfg.resolution:
        raise UserError(f"{path} was prepared at {ds.resolution} px but data.resolution is {data_cfg.resolution}: "
                        f"set data.resolution: {ds.resolution} or re-ingest with --resolution {data_cfg.resolution}")
    m = ds.manifest
    rows = np.flatnonzero((m["split"] == "train").to_numpy())
    if not len(rows):
        raise UserError(f"{path}: no items in the train split")
    labels = None
    if data_cfg.label_column:
        if m["label"].isna().iloc[rows].any():
            raise UserError(f"{path}: some items have no label; ingest with --label-column {data_cfg.label_column}")
        labels = m["label"].iloc[rows].tolist()
    has_condition = None
    if conditions:
        if not ds.has_conditions:
            raise UserError(f"{path} has no condition images, which context.image_condition trains on: set "
                            "data.condition_column to the metadata column naming each item's condition image, or "
                            "ingest.doodles: true to derive a doodle from every image")
        has_condition = torch.from_numpy(m["condition"].notna().to_numpy()[rows])
    return TrainingData(ShardImages(ds, rows, conditions), m["caption"].iloc[rows].tolist(), labels, ds,
                        has_condition)


def _ingest_cached(data_cfg, ingest_cfg) -> Path:
    src = Path(data_cfg.path)
    meta = src / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{src}: no metadata.jsonl and not a prepared dataset. A dataset is a folder of images "
                        f"plus metadata.jsonl with 'file_name' and '{data_cfg.caption_column}' on each line (make "
                        "one with `diffuse data shapes`), or the output of `diffuse data ingest`.")
    h = hashlib.sha256(meta.read_bytes())
    # a changed image or condition image file invalidates the cache too, also in subfolders (doodles/)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(src).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps([data_cfg.resolution, data_cfg.caption_column, data_cfg.label_column,
                         data_cfg.condition_column, ingest_cfg.settings()]).encode())
    out = Path(data_cfg.prepared_cache) / f"{src.name}-{h.hexdigest()[:16]}"
    if not is_prepared(out):
        log.info("ingesting %s into %s (once; later runs reuse it)", src, out)
        info = ingest(str(src), out, data_cfg.resolution, ingest_cfg, caption_column=data_cfg.caption_column,
                      label_column=data_cfg.label_column, condition_column=data_cfg.condition_column,
                      progress=False)
        if info["num_quarantined"]:
            log.warning("%d items quarantined (reasons in %s/quarantine.jsonl)", info["num_quarantined"], out)
    return out
