"""GPU benchmark (run by bench/gpu_check.sh): bf16 training throughput and MFU of our trainer, and batched
sampling throughput, on the shapes config and on a larger 64x64 UNet where the GPU has work to do.

MFU = measured FLOP/s / peak dense bf16 FLOP/s; FLOPs per step are counted by torch's FlopCounterMode on
one real forward+backward pass (not estimated).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def step_flops(cfg) -> float:
    """FLOPs of one training step's forward+backward, counted on a real batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.encoders import ContextBatch, MiniLMEncoder
    from pipeline.objective import diffusion_loss
    from pipeline.train import make_train_scheduler, model_spec, unet_from_config

    spec = model_spec(cfg, MiniLMEncoder(cfg.context.max_length), 384)
    unet = unet_from_config(spec, cfg).cuda()
    sched = make_train_scheduler(cfg)
    sched.alphas_cumprod = sched.alphas_cumprod.cuda()
    b, L = cfg.train.batch_size, cfg.context.max_length
    ctx = ContextBatch(torch.randn(b, L, 384, device="cuda"), torch.ones(b, L, device="cuda", dtype=torch.long),
                       torch.randn(b, 384, device="cuda"))
    x0 = torch.randn(b, 3, cfg.data.resolution, cfg.data.resolution, device="cuda")
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        diffusion_loss(unet, spec, sched, x0, ctx, torch.Generator().manual_seed(0)).backward()
    return float(fc.get_total_flops())


def train_bench(cfg, steps: int, run_dir: Path) -> dict:
    from pipeline.train import train

    cfg = cfg.model_copy(update={"run_dir": run_dir, "train": cfg.train.model_copy(update={
        "max_steps": steps, "log_every": steps // 2, "checkpoint_every": 10**9, "warmup_steps": 1})})
    train(cfg, progress=False, overwrite=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"img_per_s"' in x]
    img_s = lines[-1]["img_per_s"]  # the second half: compiled/warm
    flops = step_flops(cfg)
    achieved = flops * img_s / cfg.train.batch_size
    return {"batch": cfg.train.batch_size, "img_per_s": round(img_s, 1), "flops_per_step": flops,
            "achieved_tflops": round(achieved / 1e12, 2), "mfu": round(achieved / peak_flops(), 4)}


def sample_bench(model_dir: Path, n: int) -> dict:
    from pipeline.model_dir import load_model
    from pipeline.sample import generate

    model = load_model(model_dir, device="cuda")
    prompts = ["a large red circle in the center on a white background"] * n
    generate(model, prompts[:8], list(range(8)), steps=4, autocast_dtype=torch.bfloat16)  # warm-up
    out = {}
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate(model, prompts, list(range(n)), steps=20, batch_size=256, autocast_dtype=dtype)
        torch.cuda.synchronize()
        out[f"{dtype_name}_img_per_s"] = round(n / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    args = ap.parse_args()
    from pipeline.config import load_config

    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    shapes = load_config(Path("configs/shapes.yaml"), {"train.batch_size": 256})
    result["train_shapes32_b256"] = train_bench(shapes, 200, Path("runs/gpu_check/shapes"))
    print(json.dumps(result, indent=2), flush=True)
    big = load_config(Path("configs/shapes.yaml"), {
        "train.batch_size": 128, "data.resolution": 64, "model.block_out_channels": [128, 256, 256, 512],
        "model.attention_levels": [False, True, True, True], "model.layers_per_block": 2})
    result["train_unet64_b128"] = train_bench(big, 100, Path("runs/gpu_check/big"))
    print(json.dumps(result, indent=2), flush=True)
    result["sample_shapes32_dpmpp20"] = sample_bench(Path("runs/gpu_check/shapes/model"), 1024)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
