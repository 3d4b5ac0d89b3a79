"""Training-step speed of UNet variants of a config: forward + backward + AdamW step on one random batch,
the variants measured in interleaved rounds so a machine whose speed drifts affects them alike. Besides model
sizes, the variants cover the precision (fp32 / bf16 autocast) and memory format (channels_last) of the step, the
input side (a cycle's resolution) and the batch size. "config as is" steps at data.resolution and
train.batch_size.

    .venv/bin/python bench/unet_variants.py [--config configs/shapes.yaml] [--rounds 6] [--only bf16 fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.model.encoders import ContextBatch, build_encoder
from pipeline.training.loop import make_train_scheduler, model_spec, unet_from_config
from pipeline.training.objective import diffusion_loss


def unet(channels: tuple[int, ...], attention: tuple[bool, ...]) -> dict:
    return {"model.block_out_channels": list(channels), "model.attention_levels": list(attention)}


VARIANTS = {  # overrides of the config; "side" and "batch": the input images' side and the batch size of the step
    "config as is": {},
    "config, 16x16 input (a cycle's resolution)": {"side": 16},
    "config, 16x16 input, batch 64": {"side": 16, "batch": 64},
    "config, 24x24 input": {"side": 24},
    "config, batch 16 (a cycle's batch size)": {"batch": 16},
    "(64, 96, 128), attention at 8x8 and 4x4": unet((64, 96, 128), (False, True, True)),
    "(96, 96, 128), attention at 8x8 and 4x4": unet((96, 96, 128), (False, True, True)),
    "(96, 96, 128), no attention": unet((96, 96, 128), (False, False, False)),
    "(128, 128, 128), attention at 4x4": unet((128, 128, 128), (False, False, True)),
    "(64, 96, 128), attention at 4x4": unet((64, 96, 128), (False, False, True)),
    "(32, 64, 128), attention at 4x4": unet((32, 64, 128), (False, False, True)),
    "config, fp32": {"train.precision": "fp32", "train.channels_last": False},
    "config, fp32, channels_last": {"train.precision": "fp32", "train.channels_last": True},
    "config, bf16 autocast": {"train.precision": "bf16", "train.channels_last": False},
    "config, bf16 autocast, channels_last": {"train.precision": "bf16", "train.channels_last": True},
    "config, 16x16 input, bf16 autocast": {"side": 16, "train.precision": "bf16", "train.channels_last": False},
    "config, batch 16, bf16 autocast": {"batch": 16, "train.precision": "bf16", "train.channels_last": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/shapes.yaml")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="training steps per variant per round")
    ap.add_argument("--only", nargs="*", help="only the variants whose names contain one of these words "
                    "(\"config as is\" always runs: the ratios are against it)")
    args = ap.parse_args()
    base = load_config(args.config)
    encoder = build_encoder(base.context.encoder, base.context.max_length, base.context.clip_path)
    length = base.context.max_length
    g = torch.Generator().manual_seed(0)
    runs = {}
    for name, variant in VARIANTS.items():
        if args.only and name != "config as is" and not any(word in name for word in args.only):
            continue
        overrides = {k: v for k, v in variant.items() if k not in ("side", "batch")}
        cfg = load_config(args.config, overrides)
        spec = model_spec(cfg, encoder, encoder.dim)
        unet = unet_from_config(spec, cfg)
        if cfg.train.channels_last:  # as the trainer does on the CPU: None (the default) is off there
            unet = unet.to(memory_format=torch.channels_last)
        bs, side = variant.get("batch", cfg.train.batch_size), variant.get("side", cfg.data.resolution)
        x = torch.randn(bs, 3, side, side)
        x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
        ctx = ContextBatch(tokens=torch.randn(bs, length, encoder.dim), mask=torch.ones(bs, length, dtype=torch.bool),
                           pooled=torch.randn(bs, encoder.dim))
        runs[name] = (cfg, spec, unet, make_train_scheduler(cfg), torch.optim.AdamW(unet.parameters(), lr=1e-3),
                      x, ctx)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, (cfg, spec, unet, scheduler, opt, x, ctx) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
                    loss = diffusion_loss(unet, spec, scheduler, x, ctx, g, cfg.diffusion.loss_weighting,
                                          cfg.diffusion.snr_gamma)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if rnd:
                rates[name].append(args.steps * x.shape[0] / (time.perf_counter() - start))
    ref = statistics.median(rates["config as is"])
    print(f"config as is: batch {base.train.batch_size}, {base.data.resolution}x{base.data.resolution}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds")
    print("| variant | parameters | img/s | vs config |\n| --- | ---: | ---: | ---: |")
    for name, r in rates.items():
        params = sum(p.numel() for p in runs[name][2].parameters())
        print(f"| {name} | {params / 1e6:.2f} M | {statistics.median(r):.1f} | {statistics.median(r) / ref:.2f}× |")


if __name__ == "__main__":
    main()
