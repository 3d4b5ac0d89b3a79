"""Data loader against the trainer: img/s the loader delivers from prepared shards (memory-mapped, worker
processes) and img/s the training loop consumes, same config, one run. The loader must stay far ahead.

    .venv/bin/python bench/loader_throughput.py [--config configs/shapes.yaml] [--batches 400]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from train_throughput import ours

from pipeline.config import load_config
from pipeline.data.loader import open_training_data
from pipeline.training.batches import batch_loader

sys.path.insert(0, str(Path(__file__).parent))


def loader_rate(cfg, batches: int, workers: int) -> float:
    data = open_training_data(cfg.data, cfg.ingest)
    it = batch_loader(data.images, cfg.seed, 0, cfg.train.batch_size, workers, pin_memory=False)
    for _ in range(10):  # workers started, pages warm
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        _, pixels, _ = next(it)
        pixels.float()  # what the training step does first
    return batches * cfg.train.batch_size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes.yaml")
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/bench/loader.json")
    args = ap.parse_args()
    cfg = load_config(Path(args.config))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rates = {f"loader_{w}_workers_img_s": round(loader_rate(cfg, args.batches, w)) for w in (0, 1, 2)}
    trainer, _ = ours(cfg, args.steps, 5, out.parent / "loader_run")
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}", "config": args.config,
              "batch": cfg.train.batch_size, **rates, "trainer_img_s": round(trainer, 1),
              "ratio_default_workers": round(rates[f"loader_{cfg.data.loader_workers}_workers_img_s"] / trainer, 1)}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
