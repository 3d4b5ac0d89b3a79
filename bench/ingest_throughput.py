"""Ingest throughput: 256 px JPEG sources -> prepared shards, with all cores, against the reference way (decode
and resize each image in one process with PIL and keep the arrays, as the trainer's old imagefolder loader did).

    .venv/bin/python bench/ingest_throughput.py [--num 4000] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.images import to_square


def make_sources(root: Path, num: int) -> None:
    """Photo-like 256x256 JPEGs (smooth gradients + texture), quality 90, with a metadata.jsonl."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    lines = []
    for i in range(num):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], -1) * 200
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:06d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:06d}.jpg", "text": f"picture {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def reference(root: Path, resolution: int) -> int:
    arrays = []
    for line in (root / "metadata.jsonl").read_text().splitlines():
        with Image.open(root / json.loads(line)["file_name"]) as im:
            arrays.append(np.asarray(to_square(im, resolution)))
    return len(np.stack(arrays))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=4000)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--out", default="runs/bench/ingest.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        make_sources(tmp / "src", args.num)
        results = {}
        for res in sorted({args.resolution, 64}, reverse=True):
            t = time.perf_counter()
            n_ref = reference(tmp / "src", res)
            ref_s = time.perf_counter() - t
            t = time.perf_counter()
            info = ingest(str(tmp / "src"), tmp / f"out{res}", res, IngestConfig(near_duplicates="flag"),
                          progress=False)
            ours_s = time.perf_counter() - t
            assert info["num_items"] == n_ref == args.num, (info["num_items"], n_ref)
            results[f"{res}px"] = {"ingest_img_s": round(args.num / ours_s), "reference_img_s": round(n_ref / ref_s),
                                   "ratio": round(ref_s / ours_s, 2), "shards": info["num_shards"]}
            print(res, results[f"{res}px"], flush=True)
        out = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "images": args.num, "source": "256x256 JPEG q90", "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
