"""`diffuse data ingest`: an image-text source (pipeline/data/sources.py) -> a prepared dataset version
(pipeline/data/prepared.py).

Images are decoded once, in parallel, into uint8 shards; every item that cannot be used goes to quarantine.jsonl
with its reason, and the rest are kept. Same input -> byte-identical output. Each image is centre-cropped to the
square resolution x resolution, or with `ingest.buckets` resized to cover the aspect-ratio bucket closest to its
own (pipeline/data/buckets.py) and centre-cropped to it. Condition images get the image's size and crop;
`ingest.doodles` derives one (pipeline/data/doodle.py) for every item without one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from pipeline.config import IngestConfig
from pipeline.data.buckets import bucket_sizes, nearest_bucket
from pipeline.data.doodle import doodle_from_image
from pipeline.data.prepared import (
    CONDITIONS_DIR,
    IMAGES_DIR,
    SHARD_PATTERN,
    SIZE_COLUMNS,
    compute_version,
    manifest_schema,
)
from pipeline.data.sources import Quarantined, RawItem, source_items
from pipeline.errors import UserError
from pipeline.images import to_rgb

# ---------------------------------------------------------------- decoding (runs in worker processes)


def prepare_image(data: bytes, resolution: int, cfg: IngestConfig,
                  buckets: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, dict]:
    """Bytes -> (R, R, 3) uint8 and facts about the source; Quarantined when the image is unusable. With
    `buckets` ((width, height) sizes): (H, W, 3) at the bucket closest to the image's aspect ratio."""
    if not data:
        raise Quarantined("empty_file", "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before any pixel is decoded
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Quarantined("not_an_image", "not an image (format not recognised)") from None
    except Exception as e:
        raise Quarantined("corrupt", f"unreadable image header ({e})") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise Quarantined("too_large", f"{w}x{h} = {w * h} pixels, over ingest.max_pixels ({cfg.max_pixels}); "
                                       "a decompression bomb or an image to downscale first")
    if min(w, h) < cfg.min_size:
        raise Quarantined("too_small", f"{w}x{h} is smaller than ingest.min_size ({cfg.min_size} px)")
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated: first of {frames} frames")
    try:
        im.seek(0)
        orientation = im.getexif().get(0x0112, 1)
        turned = orientation in (5, 6, 7, 8)  # shown rotated by 90 degrees: width and height swap
        size = (resolution, resolution) if buckets is None else nearest_bucket(*((h, w) if turned else (w, h)),
                                                                                buckets)
        if im.format == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target
            im.draft(None, _covering(w, h, *(size[::-1] if turned else size)))
        im.load()
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
        im = to_rgb(im, notes)
        if im.size != size:  # scaled to cover the target, centre-cropped to it
            im = ImageOps.fit(im, size, Image.Resampling.BICUBIC)
    except Quarantined:
        raise
    except Exception as e:
        raise Quarantined("corrupt", f"corrupt or truncated image ({e})") from None
    return np.asarray(im, dtype=np.uint8), {"orig_width": w, "orig_height": h, "note": "; ".join(notes) or None}


def _covering(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """w x h scaled (rounded down) so that it just covers width x height: the side that binds gets its size."""
    if width * h >= height * w:
        return width, max(1, h * width // w)
    return max(1, w * height // h), height


def check_caption(caption, max_chars: int) -> str:
    if caption is None:
        raise Quarantined("missing_caption", "no caption")
    if not isinstance(caption, str):
        raise Quarantined("missing_caption", f"caption is not text ({type(caption).__name__})")
    if not caption.strip():
        raise Quarantined("empty_caption", "caption is empty or whitespace")
    if len(caption) > max_chars:
        raise Quarantined("long_caption", f"caption has {len(caption)} characters, over ingest.max_caption_chars "
                                          f"({max_chars})")
    return " ".join(caption.split())  # newlines and runs of spaces are noise to a text encoder


_STAGING: dict[str, np.memmap] = {}


def _staging(path: str, slots: int, planes: int, resolution: int, mode: str) -> np.memmap:
    """A file-backed array of image slots shared by the main process and the workers: pixels cross processes
    through the page cache instead of being pickled through a pipe (~0.7 ms per 256 px image on 2 cores).
    Plane 0 of a slot holds the image, plane 1 (when conditions are possible) its condition image, each as the
    first H*W*3 bytes of room for resolution^2 pixels (the most any bucket has)."""
    if path not in _STAGING:
        _STAGING.clear()
        _STAGING[path] = np.memmap(path, dtype=np.uint8, mode=mode, shape=(slots, planes, resolution * resolution * 3))
    return _STAGING[path]


def _staged(staging: np.memmap, slot: int, plane: int, height: int, width: int) -> np.ndarray:
    """The (height, width, 3) image in a staging slot's plane."""
    return staging[slot, plane, : height * width * 3].reshape(height, width, 3)


def _work(args: tuple[RawItem, int, list[tuple[int, int]] | None, IngestConfig, str, int, int, int]) -> dict:
    """One item, in a worker process: its pixels (and condition pixels) into staging slot `slot`, and a result
    row (or a quarantine record) back."""
    item, resolution, buckets, cfg, staging, slots, planes, slot = args
    if item.error:
        return {"item": item.key, "kind": item.error[0], "reason": item.error[1]}
    try:
        caption = check_caption(item.caption, cfg.max_caption_chars)
        pixels, facts = prepare_image(item.data, resolution, cfg, buckets)
        condition, condition_source = _condition(item, item_id(item.key, caption), pixels, resolution, cfg)
    except Quarantined as q:
        return {"item": item.key, "kind": q.kind, "reason": str(q)}
    # phash works on a 32x32 grey thumbnail anyway; a fast box filter makes it here, and the statistics use it too
    thumb = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BOX)
    small = np.asarray(thumb, dtype=np.float32)
    height, width = pixels.shape[:2]
    slots_array = _staging(staging, slots, planes, resolution, "r+")
    _staged(slots_array, slot, 0, height, width)[:] = pixels
    if condition is not None:
        _staged(slots_array, slot, 1, height, width)[:] = condition
    return {
        "key": item.key, "caption": caption, "label": item.label, "slot": slot, "condition": condition_source,
        "sha256": hashlib.sha256(item.data).hexdigest(), "phash": str(imagehash.phash(thumb)),
        "pixel_mean": float(small.mean()), "pixel_std": float(small.std()), "width": width, "height": height,
        **facts,
    }


def _condition(item: RawItem, iid: str, pixels: np.ndarray, resolution: int,
               cfg: IngestConfig) -> tuple[np.ndarray | None, str | None]:
    """The item's condition image and what it is (manifest column `condition`): its own condition file prepared
    exactly like the image (at the image's size: the same bucket), else a doodle of the prepared image seeded by
    the item id (when cfg.doodles: the same on every run and with any worker count), else (None, None)."""
    if item.condition is not None:
        try:
            size = (pixels.shape[1], pixels.shape[0])
            return prepare_image(item.condition, resolution, cfg, [size])[0], item.condition_key
        except Quarantined as q:
            raise Quarantined("bad_condition_image", f"condition image {item.condition_key}: {q}") from None
    if cfg.doodles:
        return doodle_from_image(pixels, seed=int(iid, 16)), "doodle"
    return None, None


# ---------------------------------------------------------------- near-duplicate index


class NearDuplicateIndex:
    """64-bit perceptual hashes within Hamming distance d: split into d+1 bands, two hashes that close share at
    least one band exactly (pigeonhole), so only hashes sharing a band are compared."""

    def __init__(self, max_distance: int):
        self.d = max_distance
        bands = max_distance + 1
        edges = [64 * b // bands for b in range(bands + 1)]
        self.masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.masks]
        self.first: dict[int, str] = {}  # hash -> id of the first kept item with it

    def find(self, h: int) -> tuple[str, int] | None:
        if h in self.first:
            return self.first[h], 0
        best = None
        for mask, table in zip(self.masks, self.tables, strict=True):
            for other in table.get(h & mask, ()):
                dist = (h ^ other).bit_count()
                if dist <= self.d and (best is None or dist < best[1]):
                    best = (self.first[other], dist)
        return best

    def add(self, h: int, item_id: str) -> None:
        if h in self.first:
            return
        self.first[h] = item_id
        for mask, table in zip(self.masks, self.tables, strict=True):
            table.setdefault(h & mask, []).append(h)


# ---------------------------------------------------------------- writing the prepared dataset


@dataclass
class _Shard:
    """A shard being filled: images of one size (and their condition images), and their manifest rows."""

    pixels: np.ndarray  # untouched pages of np.empty cost no memory
    conditions: np.ndarray | None
    rows: list[dict] = field(default_factory=list)


@dataclass
class _Writer:
    """Fills image shards of `shard_bytes` at most, each of one image size (a shard per bucket being filled,
    written when full: with buckets, up to one shard's memory per bucket), and with `conditions` condition shards
    in step with them (white for an item without one), so row r of either sits at the same (shard, index).
    Rows stay in the order they were added."""

    out: Path
    shard_bytes: int
    conditions: bool = False
    rows: list[dict] = field(default_factory=list)
    filling: dict[tuple[int, int], _Shard] = field(default_factory=dict)  # (height, width) -> its open shard
    shards: int = 0

    def add(self, row: dict, pixels: np.ndarray, condition: np.ndarray | None = None) -> None:
        size = pixels.shape[:2]
        if size not in self.filling:
            per_shard = max(1, self.shard_bytes // pixels.nbytes)
            buffer = np.empty((per_shard, *pixels.shape), dtype=np.uint8)
            self.filling[size] = _Shard(buffer, np.empty_like(buffer) if self.conditions else None)
        shard = self.filling[size]
        row["index"] = len(shard.rows)
        shard.rows.append(row)
        self.rows.append(row)
        shard.pixels[row["index"]] = pixels
        if self.conditions:
            shard.conditions[row["index"]] = 255 if condition is None else condition
        if len(shard.rows) == len(shard.pixels):
            self._write(size)

    def flush(self) -> None:
        for size in sorted(self.filling):
            self._write(size)

    def _write(self, size: tuple[int, int]) -> None:
        shard = self.filling.pop(size)
        n = len(shard.rows)
        for row in shard.rows:
            row["shard"] = self.shards
        np.save(self.out / IMAGES_DIR / SHARD_PATTERN.format(self.shards), shard.pixels[:n])
        if self.conditions:
            np.save(self.out / CONDITIONS_DIR / SHARD_PATTERN.format(self.shards), shard.conditions[:n])
        self.shards += 1


def item_id(key: str, caption: str) -> str:
    return hashlib.sha256(f"{key}\n{caption}".encode()).hexdigest()[:16]


def split_of(iid: str, eval_fraction: float) -> str:
    return "eval" if int(iid[:8], 16) < eval_fraction * 16**8 else "train"


def ingest(source: str, out_dir: Path, resolution: int, cfg: IngestConfig | None = None, *,
           caption_column: str | None = None, label_column: str | None = None, name: str | None = None,
           condition_column: str | None = None, progress: bool = True) -> dict:
    """Read `source`, write the prepared dataset to `out_dir` (replaced atomically), return its dataset.json.
    `condition_column`: the metadata/CSV column naming each item's condition image file (empty: none)."""
    cfg = cfg or IngestConfig()
    buckets = bucket_sizes(resolution, cfg.buckets) if cfg.buckets.enabled else None  # None: the square
    out_dir = Path(out_dir)
    name = name or out_dir.name
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    conditions = bool(condition_column or cfg.doodles)
    if conditions:
        (tmp / CONDITIONS_DIR).mkdir()
    writer = _Writer(tmp, cfg.shard_mb * 2**20, conditions)
    planes = 2 if conditions else 1
    slots = max(1, min(cfg.chunk_size, (256 << 20) // (planes * resolution * resolution * 3)))  # staging <= 256 MB
    staging_file = tmp / "staging.u8"
    staging = _staging(str(staging_file), slots, planes, resolution, "w+")
    quarantine: list[dict] = []
    seen: dict[tuple[str, str], str] = {}  # (image sha256, caption) -> id
    seen_images: set[str] = set()
    near = NearDuplicateIndex(cfg.near_duplicate_distance)
    counts = Counter()
    items = source_items(str(source), caption_column, label_column, condition_column)
    bar = tqdm(desc="ingest", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with ProcessPoolExecutor(max_workers=cfg.workers or os.cpu_count()) as pool:
            while chunk := _take(items, slots):
                work = [(it, resolution, buckets, cfg, str(staging_file), slots, planes, k)
                        for k, it in enumerate(chunk)]
                for res in pool.map(_work, work, chunksize=16):
                    bar.update(1)
                    if "reason" in res:
                        quarantine.append(res)
                        continue
                    iid = item_id(res["key"], res["caption"])
                    pair = (res["sha256"], res["caption"])
                    if pair in seen:
                        counts["exact_duplicates"] += 1
                        quarantine.append({"item": res["key"], "kind": "duplicate",
                                           "reason": f"exact duplicate of item {seen[pair]} (same image bytes and "
                                                     "caption)"})
                        continue
                    h = int(res["phash"], 16)
                    # the same image bytes with another caption is a second caption, not a near duplicate
                    match = None if res["sha256"] in seen_images else near.find(h)
                    near_of = None
                    if match is not None:
                        counts["near_duplicates"] += 1
                        if cfg.near_duplicates == "quarantine":
                            quarantine.append({"item": res["key"], "kind": "near_duplicate",
                                               "reason": f"near duplicate of item {match[0]} (perceptual hash "
                                                         f"distance {match[1]})"})
                            continue
                        near_of = match[0]
                    seen[pair] = iid
                    seen_images.add(res["sha256"])
                    near.add(h, iid)
                    writer.add({"id": iid, "caption": res["caption"], "split": split_of(iid, cfg.eval_fraction),
                                "label": res["label"], "source_uri": res["key"], "sha256": res["sha256"],
                                "phash": res["phash"], "orig_width": res["orig_width"],
                                "orig_height": res["orig_height"], "pixel_mean": res["pixel_mean"],
                                "pixel_std": res["pixel_std"], "near_duplicate_of": near_of, "note": res["note"],
                                "condition": res["condition"], "width": res["width"], "height": res["height"]},
                               *_staged_pair(staging, res))
        writer.flush()
        bar.close()
        _STAGING.clear()
        del staging
        staging_file.unlink()
        if not writer.rows:
            raise UserError(f"{source}: no usable items ({len(quarantine)} quarantined, e.g. "
                            f"{quarantine[0]['item']}: {quarantine[0]['reason']})" if quarantine
                            else f"{source}: no items found")
        num_conditions = sum(r["condition"] is not None for r in writer.rows)
        named = any(r["condition"] not in (None, "doodle") for r in writer.rows) or \
            any(q["kind"] == "bad_condition_image" for q in quarantine)
        if condition_column and not named:
            raise UserError(f"{source}: no item names a condition image in '{condition_column}'; check "
                            "--condition-column (e.g. conditioning_image)")
        if not num_conditions:
            shutil.rmtree(tmp / CONDITIONS_DIR, ignore_errors=True)
        # the prepared size is only recorded for bucketed datasets: square ones stay as they were
        schema = manifest_schema() if buckets else pa.schema([f for f in manifest_schema()
                                                              if f.name not in SIZE_COLUMNS])
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in writer.rows], schema=schema)
        pq.write_table(table, tmp / "manifest.parquet")
        (tmp / "quarantine.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine))
        info = {
            "name": name, "version": compute_version(tmp), "resolution": resolution,
            **(_bucket_counts(writer.rows) if buckets else {}), "source": str(source),
            "num_items": len(writer.rows), "num_shards": writer.shards, "num_conditions": num_conditions,
            "condition_column": condition_column,
            "num_train": sum(r["split"] == "train" for r in writer.rows),
            "num_eval": sum(r["split"] == "eval" for r in writer.rows),
            "num_quarantined": len(quarantine),
            "quarantined_by_kind": dict(sorted(Counter(q["kind"] for q in quarantine).items())),
            "exact_duplicates": counts["exact_duplicates"], "near_duplicates": counts["near_duplicates"],
            "near_duplicate_policy": cfg.near_duplicates,
            "notes": dict(sorted(Counter(n.split(":")[0].split(" ")[0] for r in writer.rows if r["note"]
                                         for n in r["note"].split("; ")).items())),
            "ingest": cfg.settings(exclude={"workers", "chunk_size"}),
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
        return info
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _staged_pair(staging: np.memmap, res: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """A worker's result's image and condition image (None without one) in the staging file."""
    size = res["height"], res["width"]
    return (_staged(staging, res["slot"], 0, *size),
            _staged(staging, res["slot"], 1, *size) if res["condition"] else None)


def _bucket_counts(rows: list[dict]) -> dict:
    """dataset.json's record of a bucketed dataset: the buckets ([width, height]) its items use, and how many
    items each holds."""
    counts = Counter((r["width"], r["height"]) for r in rows)
    return {"buckets": [list(b) for b in sorted(counts)],
            "items_per_bucket": {f"{w}x{h}": counts[w, h] for w, h in sorted(counts)}}


def _take(it: Iterator, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out
