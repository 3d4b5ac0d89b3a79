"""The latent cache (pipeline/training/latents.py) on a real dataset and VAE: what each run encodes and how long it
takes. A fresh cache is filled once; an unchanged second run; another VAE (the same one with perturbed weights);
the source folder re-ingested with one image changed.

    .venv/bin/python bench/latent_cache.py [--config configs/shapes_latent.yaml] [--source data/shapes64]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pipeline.config import load_config
from pipeline.data.ingest import ingest
from pipeline.data.prepared import open_prepared
from pipeline.model.vae import load_vae, vae_spec
from pipeline.training.latents import ensure_latents


def timed_run(prepared: Path, vae_dir: Path, root: Path, flip: bool, batch_size: int) -> dict:
    ds = open_prepared(prepared)
    rows = np.flatnonzero((ds.manifest["split"] == "train").to_numpy())
    start = time.perf_counter()
    result = ensure_latents(ds, rows, load_vae(vae_dir), vae_spec(vae_dir), root, flip=flip, conditions=False,
                            batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return {"items": len(rows), "encoded": result.encoded, "seconds": round(seconds, 2),
            "img_per_s": round(result.encoded / seconds, 1) if result.encoded else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes_latent.yaml")
    ap.add_argument("--source", default="data/shapes64", help="the imagefolder the prepared dataset came from")
    ap.add_argument("--out", default="runs/bench/latent_cache.json")
    args = ap.parse_args()
    cfg = load_config(Path(args.config))
    vae_dir, flip, batch = Path(cfg.model.vae), cfg.data.random_flip, cfg.train.encode_batch_size

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        shutil.copytree(args.source, source)
        prepared = tmp / "prepared" / "data"
        ingest(str(source), prepared, cfg.data.resolution, cfg.ingest, progress=False)
        root = tmp / "prepared" / "data.latents"
        runs = {"first": timed_run(prepared, vae_dir, root, flip, batch),
                "unchanged": timed_run(prepared, vae_dir, root, flip, batch)}

        other = tmp / "other_vae"
        vae = AutoencoderKL.from_pretrained(str(vae_dir))
        with torch.no_grad():
            vae.encoder.conv_in.weight.mul_(1.01)
        vae.save_pretrained(str(other))
        runs["changed_vae"] = timed_run(prepared, other, root, flip, batch)

        manifest = open_prepared(prepared).manifest
        changed = source / manifest[manifest["split"] == "train"]["source_uri"].iloc[0]  # a training item's file
        with Image.open(changed) as im:
            im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)
        ingest(str(source), prepared, cfg.data.resolution, cfg.ingest, progress=False)
        runs["one_image_changed"] = timed_run(prepared, vae_dir, root, flip, batch)
        size_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20

    result = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, cpu", "config": args.config, "vae": str(vae_dir),
              "random_flip": flip, "runs": runs, "cache_mb_two_vaes": round(size_mb, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
