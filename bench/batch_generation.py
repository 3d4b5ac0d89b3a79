"""Batch generation throughput: images/s at DPM-Solver++ 20 steps with classifier-free guidance.

    .venv/bin/python bench/batch_generation.py [--model runs/shapes/model] [--prompts 64] [--batch-size 32]
        [--device cuda --bf16]

Three ways to make the same images with the same model, in one process:
  reference   a per-prompt loop that builds a diffusers pipeline (a DiffusionPipeline subclass holding the UNet
              and a fresh DPMSolverMultistepScheduler) and calls it once per prompt, the way a script calling
              a StableDiffusionPipeline-style `pipe(prompt, generator=...)` does: guidance doubles each call's
              batch to 2
  batched     pipeline.model.sampling.generate on batches of --batch-size prompts (guidance batched as 2 x batch)
  end-to-end  pipeline.generation.batch.generate_shard: prompt store (SQLite) -> batches -> PNGs written atomically
              -> output rows; includes model load, coverage scoring, PNG encoding and the database
The images of `reference` and `batched` are compared pixel for pixel (same seed -> same image). Reference and
batched run interleaved, one batch of prompts at a time, so a machine shared with other work slows both alike.
On a busy 2-core machine pass --threads 1: with 2 OpenMP threads on cores that other processes also use, the
small per-prompt operations stall on thread synchronisation and the reference looks far slower than it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from pipeline.config import GenerationConfig
from pipeline.generation.batch import generate_shard
from pipeline.generation.prompt_store import open_store, parse_prompt
from pipeline.images import to_uint8
from pipeline.model.encoders import ContextBatch
from pipeline.model.folder import load_model
from pipeline.model.network import denoise
from pipeline.model.sampling import encode_prompts, generate
from pipeline.shapes import dataset as shapes


def prompt_set(n: int) -> list[str]:
    combos = [(c, s, p) for p in shapes.POSITIONS for c in shapes.COLOURS for s in shapes.SHAPES]
    return [f"a {c} {s} (large) {'in the center' if p == 'center' else 'at the ' + p}, on white"
            for c, s, p in combos[:n]]


def pipeline_class():
    class PromptPipeline(DiffusionPipeline):
        """A minimal diffusers pipeline for this model family: UNet + scheduler as registered modules; the text
        encoder (MiniLM, loaded once like a pipeline's text_encoder) and the conditioning spec as attributes."""

        def __init__(self, unet, scheduler, spec=None):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)
            self.spec = spec

        @torch.no_grad()
        def __call__(self, prompt: str, generator: torch.Generator, num_inference_steps: int = 20,
                     guidance_scale: float = 4.0, negative_prompt: str = "", autocast_dtype=None):
            spec, device = self.spec, self.unet.device
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            res = spec.resolution
            latents = torch.randn(1, 3, res, res, generator=generator).to(device) * self.scheduler.init_noise_sigma
            ctx = encode_prompts(spec, [prompt]).cat(encode_prompts(spec, [negative_prompt]))
            ctx = ContextBatch(*[None if a is None else a.to(device) for a in ctx.astuple()])
            for t in self.scheduler.timesteps:
                x_in = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    pred = denoise(self.unet, spec, x_in, t.expand(2).to(device), ctx).float()
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, generator=[generator], return_dict=False)[0]
            return to_uint8(latents).cpu()

    return PromptPipeline


def reference(loaded, prompts, seeds, steps, guidance, dtype) -> tuple[float, torch.Tensor]:
    cls = pipeline_class()
    out = []
    t0 = time.perf_counter()
    for p, s in zip(prompts, seeds, strict=True):
        pipe = cls(loaded.unet, DPMSolverMultistepScheduler.from_config(loaded.scheduler_config), loaded.spec)
        out.append(pipe(p, torch.Generator().manual_seed(s), steps, guidance, autocast_dtype=dtype))
    if loaded.unet.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cat(out)


def batched(loaded, prompts, seeds, steps, guidance, batch_size, dtype) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    images = generate(loaded, prompts, seeds, sampler="dpmpp", steps=steps, guidance=guidance,
                      batch_size=batch_size, autocast_dtype=dtype)
    if loaded.unet.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, images


def end_to_end(model: str, prompts, seeds, steps, guidance, batch_size, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/prompts.db"
        gc = GenerationConfig(steps=steps, guidance=guidance)
        store = open_store(url)
        store.add([parse_prompt({"text": p, "seed": s}, gc) for p, s in zip(prompts, seeds, strict=True)], check=gc)
        store.close()
        cfg = Path(tmp) / "gen.yaml"
        cfg.write_text(yaml.safe_dump({"generation": {"store_url": url, "artifact_root": f"{tmp}/out",
                                                      "batch_size": batch_size}, "tracking": {"enabled": False}}))
        s = generate_shard(model, config=cfg, device=device)
    assert s.images == len(prompts) and not s.failed, s
    return {"seconds": s.seconds, "images": s.images, "sample_seconds": s.sample_seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/shapes/model")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="runs/bench/batch_generation.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not Path(args.model, "conditioning.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `make demo` (or pass --model RUN_DIR/model)")
    loaded = load_model(Path(args.model), args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    prompts = prompt_set(args.prompts)
    seeds = list(range(len(prompts)))
    load_before = os.getloadavg()
    # warm-up: text encoder load, first-call allocations
    batched(loaded, prompts[:2], seeds[:2], 2, args.guidance, 2, dtype)
    reference(loaded, prompts[:1], seeds[:1], 2, args.guidance, dtype)

    # interleaved, one batch worth of prompts at a time: other processes' load hits both ways alike
    t_ref = t_bat = 0.0
    img_ref, img_bat = [], []
    for i in range(0, len(prompts), args.batch_size):
        chunk, chunk_seeds = prompts[i:i + args.batch_size], seeds[i:i + args.batch_size]
        t, img = reference(loaded, chunk, chunk_seeds, args.steps, args.guidance, dtype)
        t_ref, img_ref = t_ref + t, img_ref + [img]
        t, img = batched(loaded, chunk, chunk_seeds, args.steps, args.guidance, args.batch_size, dtype)
        t_bat, img_bat = t_bat + t, img_bat + [img]
        print(f"prompts {i}..{i + len(chunk) - 1}: reference {t_ref:.1f} s, batched {t_bat:.1f} s so far", flush=True)
    img_ref, img_bat = torch.cat(img_ref), torch.cat(img_bat)
    e2e = end_to_end(args.model, prompts, seeds, args.steps, args.guidance, args.batch_size, args.device)
    n = len(prompts)
    diff = int((img_ref.int() - img_bat.int()).abs().max())
    result = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, device {args.device}"
                   + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": args.model, "resolution": loaded.spec.resolution,
        "setting": {"sampler": "dpmpp", "steps": args.steps, "guidance": args.guidance, "prompts": n,
                    "batch_size": args.batch_size, "bf16": args.bf16},
        "reference_per_prompt_pipeline": {"seconds": round(t_ref, 2), "images_per_s": round(n / t_ref, 2)},
        "batched_generate": {"seconds": round(t_bat, 2), "images_per_s": round(n / t_bat, 2)},
        "end_to_end_generate_shard": {**e2e, "images_per_s": round(n / e2e["seconds"], 2),
                                      "sampling_images_per_s": round(n / e2e["sample_seconds"], 2)},
        "speedup_batched_vs_reference": round(t_ref / t_bat, 2),
        "speedup_end_to_end_vs_reference": round(t_ref / e2e["seconds"], 2),
        "max_pixel_difference_reference_vs_batched": diff,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
