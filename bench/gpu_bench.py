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
from types import SimpleNamespace

import torch
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_config
from pipeline.model.encoders import ContextBatch, MiniLMEncoder
from pipeline.model.folder import load_model
from pipeline.model.sampling import generate
from pipeline.training.loop import make_train_scheduler, model_spec, train, unet_from_config
from pipeline.training.objective import diffusion_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script's code paths (--smoke)
# a 64 px UNet where the GPU has more work to do than with the demo's
BIG_UNET = {"train.batch_size": 128, "data.resolution": 64, "model.block_out_channels": [128, 256, 256, 512],
            "model.attention_levels": [False, True, True, True], "model.layers_per_block": 2}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def spec_and_context(cfg):
    """The trainer's ModelSpec for `cfg` with MiniLM context, and a random context batch of its shape (the text
    encoder's weights are not needed to time or count the UNet)."""
    b, L, d = cfg.train.batch_size, cfg.context.max_length, MiniLMEncoder.dim
    ctx = ContextBatch(torch.randn(b, L, d, device=DEVICE), torch.ones(b, L, device=DEVICE, dtype=torch.long),
                       torch.randn(b, d, device=DEVICE))
    encoder = SimpleNamespace(id=MiniLMEncoder.id_for(L), max_length=L)  # all model_spec reads of an encoder
    return model_spec(cfg, encoder, d), ctx


def step_flops(cfg) -> float:
    """FLOPs of one training step's forward+backward, counted on a real batch."""
    spec, ctx = spec_and_context(cfg)
    unet = unet_from_config(spec, cfg).to(DEVICE)
    sched = make_train_scheduler(cfg)
    sched.alphas_cumprod = sched.alphas_cumprod.to(DEVICE)
    b = cfg.train.batch_size
    x0 = torch.randn(b, 3, cfg.data.resolution, cfg.data.resolution, device=DEVICE)
    with FlopCounterMode(display=False) as fc, torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        diffusion_loss(unet, spec, sched, x0, ctx, torch.Generator().manual_seed(0)).backward()
    return float(fc.get_total_flops())


# name: (channels_last, cudnn.benchmark, EMA foreach, torch.compile)
VARIANTS = {"as_trained": (True, False, False, False), "no_channels_last": (False, False, False, False),
            "cudnn_benchmark": (True, True, False, False), "ema_foreach": (True, False, True, False),
            "all_three": (True, True, True, False), "cudnn_bench_no_cl": (False, True, True, False)}
COMPILED = {"foreach": (True, False, True, False), "foreach_compiled": (True, False, True, True)}


def step_breakdown(cfg, steps: int, variants: dict) -> dict:
    """Where one training step's time goes, phase by phase (synchronised), on synthetic data with the trainer's
    pieces: the loss (t and noise from a CPU generator, as the trainer draws them), backward, clip + fused AdamW,
    EMA. Variants: channels_last, cudnn.benchmark and diffusers' EMA foreach; ms per step, mean of `steps`."""
    spec, ctx = spec_and_context(cfg)
    b, r = cfg.train.batch_size, cfg.data.resolution
    out = {}
    for name, (channels_last, bench, foreach, compiled) in variants.items():
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        unet = unet_from_config(spec, cfg).to(DEVICE)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        net = torch.compile(unet) if compiled else unet
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=DEVICE == "cuda")
        ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4, foreach=foreach)
        sched = make_train_scheduler(cfg)
        gen = torch.Generator().manual_seed(0)
        x0 = torch.rand(b, 3, r, r, device=DEVICE) * 2 - 1
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        times = {"loss_fwd": 0.0, "backward": 0.0, "clip_adamw": 0.0, "ema": 0.0}
        for i in range(steps + 5):
            marks = [time.perf_counter()]
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                loss = diffusion_loss(net, spec, sched, x0, ctx, gen)
            marks.append(synced())
            loss.backward()
            marks.append(synced())
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.append(synced())
            ema.step(unet.parameters())
            marks.append(synced())
            if i >= 5:  # warm-up steps (cudnn.benchmark's search, compilation) not counted
                for k, a, z in zip(times, marks[:-1], marks[1:], strict=True):
                    times[k] += (z - a) * 1000 / steps
        if name == "as_trained":  # which kernels, and how much CPU time launching them, in 3 more steps
            acts = [torch.profiler.ProfilerActivity.CPU]
            acts += [torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else []
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                        diffusion_loss(unet, spec, sched, x0, ctx, gen).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    ema.step(unet.parameters())
                sync()
            key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40), flush=True)
        total = sum(times.values())
        out[name] = {**{k: round(v, 2) for k, v in times.items()}, "step_ms": round(total, 2),
                     "img_per_s": round(b * 1000 / total, 1)}
        print(name, out[name], flush=True)
    torch.backends.cudnn.benchmark = False
    return out


def train_bench(cfg, steps: int, run_dir: Path) -> dict:
    cfg = cfg.model_copy(update={"run_dir": run_dir, "train": cfg.train.model_copy(update={
        "max_steps": steps, "log_every": steps // 2, "checkpoint_every": 10**9, "warmup_steps": 1})})
    train(cfg, progress=False, overwrite=True)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"img_per_s"' in x]
    img_s = lines[-1]["img_per_s"]  # the second half: compiled/warm
    flops = step_flops(cfg)
    achieved = flops * img_s / cfg.train.batch_size
    return {"batch": cfg.train.batch_size, "img_per_s": round(img_s, 1), "flops_per_step": flops,
            "achieved_tflops": round(achieved / 1e12, 2), "mfu": round(achieved / peak_flops(), 4)}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synced() -> float:
    """The time once the device has finished what was queued."""
    sync()
    return time.perf_counter()


def sample_bench(model_dir: Path, n: int) -> dict:
    model = load_model(model_dir, device=DEVICE)
    prompts = ["a large red circle in the center on a white background"] * n
    generate(model, prompts[:8], list(range(8)), steps=4, autocast_dtype=torch.bfloat16)  # warm-up
    out = {}
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        sync()
        t = time.perf_counter()
        generate(model, prompts, list(range(n)), steps=20, batch_size=256, autocast_dtype=dtype)
        sync()
        out[f"{dtype_name}_img_per_s"] = round(n / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    ap.add_argument("--smoke", action="store_true", help="a few steps of each part (a dry run, also on a CPU)")
    ap.add_argument("--only", choices=["breakdown", "compile"],
                    help="run only the per-phase step breakdown (compile: with and without torch.compile)")
    args = ap.parse_args()
    small = {"train.batch_size": 8, "data.resolution": 16} if args.smoke else {}

    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
              "torch": torch.__version__}
    off = {"tracking.enabled": False}  # MLflow is not on the GPU image, and a benchmark is no experiment
    if args.only:
        n = 3 if args.smoke else 30
        variants = VARIANTS if args.only == "breakdown" else COMPILED
        for batch in (32, 256) if args.only == "breakdown" else (256,):
            cfg = load_config(Path("configs/shapes.yaml"), {"train.batch_size": batch, **off, **small})
            result[f"breakdown_shapes32_b{batch}"] = step_breakdown(cfg, n, variants)
        big = load_config(Path("configs/shapes.yaml"), {**BIG_UNET, **off, **small})
        result["breakdown_unet64_b128"] = step_breakdown(big, n, variants)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    shapes = load_config(Path("configs/shapes.yaml"), {"train.batch_size": 256, **off, **small})
    result["train_shapes32_b256"] = train_bench(shapes, 4 if args.smoke else 200, Path("runs/gpu_check/shapes"))
    print(json.dumps(result, indent=2), flush=True)
    big = load_config(Path("configs/shapes.yaml"), {**BIG_UNET, **off, **small})
    result["train_unet64_b128"] = train_bench(big, 4 if args.smoke else 100, Path("runs/gpu_check/big"))
    print(json.dumps(result, indent=2), flush=True)
    result["sample_shapes32_dpmpp20"] = sample_bench(Path("runs/gpu_check/shapes/model"), 16 if args.smoke else 1024)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
