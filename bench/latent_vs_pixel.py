"""Training cost per image of a latent model against the pixel model, in one run: the demo's UNet trained by
`diffuse train` on 64x64 images as 16x16x4 VAE latents (from the latent cache, filled before the timing) and on
32x32 images as 2x2-patched 16x16x12 pixels (configs/shapes.yaml). Both at the same batch, every step at
data.resolution, same thread count.

    .venv/bin/python bench/latent_vs_pixel.py [--latent configs/shapes_latent.yaml] [--pixel configs/shapes.yaml]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from pipeline.config import Config, load_config
from pipeline.training.loop import train


def img_per_s(cfg: Config, steps: int, warmup: int, batch: int, run_dir: Path) -> float:
    """Steady-state img/s of `diffuse train` on `cfg`: one cycle at data.resolution, the warm-up window dropped."""
    cfg = cfg.model_copy(update={"run_dir": run_dir, "tracking": cfg.tracking.model_copy(update={"enabled": False}),
                                 "train": cfg.train.model_copy(update={
                                     "max_steps": warmup + steps, "log_every": warmup, "checkpoint_every": 10**9,
                                     "warmup_steps": 1, "cycles": [], "batch_size": batch})})
    train(cfg, progress=False, overwrite=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"img_per_s"' in x]
    rates = [r["img_per_s"] for r in lines[1:]]
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean: total images / total time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", default="configs/shapes_latent.yaml")
    ap.add_argument("--pixel", default="configs/shapes.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two this many times (drift on a shared "
                    "host evens out)")
    ap.add_argument("--out", default="runs/bench/latent_vs_pixel.json")
    args = ap.parse_args()
    out = Path(args.out)
    latent, pixel = load_config(Path(args.latent)), load_config(Path(args.pixel))
    rates: dict[str, list[float]] = {"latent": [], "pixel": []}
    for _ in range(args.rounds):
        for name, cfg in (("latent", latent), ("pixel", pixel)):
            rates[name].append(img_per_s(cfg, args.steps, args.warmup, args.batch, out.parent / f"lvp_{name}"))
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    result = {
        "date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, cpu", "batch": args.batch, "steps": args.steps,
        "latent": {"config": args.latent, "input": "16x16x4 latents (64x64 images)",
                   "img_per_s": [round(r, 1) for r in rates["latent"]]},
        "pixel": {"config": args.pixel, "input": "16x16x12 patches (32x32 images)",
                  "img_per_s": [round(r, 1) for r in rates["pixel"]]},
        "latent_cost_per_image_over_pixel": round(mean["pixel"] / mean["latent"], 3),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
