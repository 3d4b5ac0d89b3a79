"""Training throughput: our trainer against a reference loop written the way diffusers'
train_text_to_image.py does it (images decoded from PNG files every step, the text encoder run every
step), same UNet config, same data, same objective, in one run. The reference runs twice: in fp32 (the script's
default, `--mixed_precision no`) and under bf16 autocast (`--mixed_precision bf16`); ours runs in the config's
`train.precision`.

    .venv/bin/python bench/train_throughput.py [--config configs/shapes.yaml] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.images import to_square
from pipeline.model.encoders import build_encoder
from pipeline.training.loop import make_train_scheduler, model_spec, train, unet_from_config
from pipeline.training.objective import diffusion_loss


def reference_loop(cfg, steps: int, warmup: int, bf16: bool) -> float:
    """img/s of the reference: per step, open+decode PNGs and run the text encoder (bf16: both under bf16
    autocast, as the script's `--mixed_precision bf16` runs them)."""
    root = Path(cfg.data.path)
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    encoder = build_encoder(cfg.context.encoder, cfg.context.max_length, cfg.context.clip_path)
    spec = model_spec(cfg, encoder, encoder.dim)  # the same UNet as ours; context left unstandardized
    unet = unet_from_config(spec, cfg)
    scheduler = make_train_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(0)
    bs = cfg.train.batch_size
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(0, len(records), (bs,), generator=g).tolist()
        pixels = []
        for i in idx:
            with Image.open(root / records[i]["file_name"]) as im:
                arr = torch.from_numpy(np.asarray(to_square(im, cfg.data.resolution)).copy())
            pixels.append(arr.permute(2, 0, 1).float() / 127.5 - 1)
        x0 = torch.stack(pixels)
        captions = [records[i][cfg.data.caption_column] for i in idx]
        captions = ["" if torch.rand(1, generator=g).item() < cfg.context.cfg_dropout else c for c in captions]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the text encoder too: the script casts
            with torch.no_grad():                                          # its frozen weights to bf16
                ctx = encoder.encode(captions)
            loss = diffusion_loss(unet, spec, scheduler, x0, ctx, g, cfg.diffusion.loss_weighting,
                                  cfg.diffusion.snr_gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * bs / (time.perf_counter() - start)


def ours(cfg, steps: int, warmup: int, run_dir: Path) -> tuple[float, float]:
    """(steady-state img/s, wall seconds including the one-off data decode and caption encoding)."""
    # one cycle, every step at data.resolution and train.batch_size, as the reference's: a config's cheaper 16x16
    # first cycle would not be like for like
    cfg = cfg.model_copy(update={"run_dir": run_dir, "train": cfg.train.model_copy(update={
        "max_steps": warmup + steps, "log_every": warmup, "checkpoint_every": 10**9, "warmup_steps": 1,
        "cycles": []})})
    t0 = time.perf_counter()
    train(cfg, progress=False, overwrite=True)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"img_per_s"' in x]
    rates = [r["img_per_s"] for r in lines[1:]]  # the first window holds the warm-up steps
    return len(rates) / sum(1 / r for r in rates), wall  # harmonic mean: total images / total time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    args = ap.parse_args()

    cfg = load_config(Path(args.config))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = reference_loop(cfg, args.steps, args.warmup, bf16=False)
    ref_bf16 = reference_loop(cfg, args.steps, args.warmup, bf16=True)
    our, wall = ours(cfg, args.steps, args.warmup, out.parent / "train_throughput_run")
    result = {
        "date": str(date.today()), "machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}", "config": args.config, "batch": cfg.train.batch_size,
        "steps": args.steps, "ours_precision": cfg.train.precision, "reference_img_s": round(ref, 1),
        "reference_bf16_img_s": round(ref_bf16, 1), "ours_img_s": round(our, 1),
        "ours_wall_s_incl_setup": round(wall, 1), "speedup": round(our / ref, 2),
        "speedup_vs_reference_bf16": round(our / ref_bf16, 2),
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
