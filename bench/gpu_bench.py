"""GPU benchmark (run by bench/gpu_check.sh): bf16 training throughput and MFU of our trainer, and batched
sampling throughput, on the shapes config and on a larger 64x64 UNet where the GPU has work to do; and a
Stable-Diffusion-1.5-size UNet (860M parameters, 64x64x4 latents = 512² images, 77 CLIP-L tokens) trained the
way the trainer trains, at the largest batch that fits, from cached latents and online (VAE encoder + text
encoder every step, as diffusers' train_text_to_image.py does).

MFU = measured FLOP/s / peak dense bf16 FLOP/s; FLOPs per step are counted by torch's FlopCounterMode on
one real forward+backward pass (not estimated).

  python bench/gpu_bench.py                      # all of it
  python bench/gpu_bench.py --only train         # the trainer's throughput and sampling (shapes, 64 px UNet)
  python bench/gpu_bench.py --only sd15          # the SD-1.5-size UNet (--sd15-variants compile: + torch.compile)
  python bench/gpu_bench.py --only breakdown     # per-phase step times (compile: with torch.compile)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.training_utils import EMAModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

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


# --- Stable Diffusion 1.5 size: UNet training from cached latents and online, at the largest batch that fits ---

# SD-1.5's UNet (unet/config.json of its release). diffusers' UNet2DConditionModel defaults are this layout but
# for cross_attention_dim (1280); spelled out so that a change of defaults cannot change the benchmark.
# attention_head_dim 8 is SD-1.5's (mis)name for 8 heads per attention layer.
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
             "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
# its VAE: 512² RGB -> 64² x 4 latents (8x down), latents scaled by 0.18215
SD15_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215}
# its text encoder, CLIP ViT-L/14's: 77 tokens of width 768
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "max_position_embeddings": 77, "vocab_size": 49408}


@dataclass(frozen=True)
class SDSetup:
    """A Stable-Diffusion-style model set and how hard to measure it."""
    unet: dict          # UNet2DConditionModel arguments
    vae: dict           # AutoencoderKL arguments (the online path runs its encoder)
    text: dict          # CLIPTextConfig arguments
    first_batch: int    # the batch search doubles from here, and refines down to this step
    max_batch: int      # ...up to here (bounds the search's time where memory would allow more)
    max_probes: int     # batch sizes tried at most, per search
    probe_steps: int    # training steps per tried batch (the second allocates the optimizer's steady state)
    warmup: int         # steps before the timed ones
    steps: int          # timed steps
    checkpointing_steps: int  # timed steps with gradient checkpointing (larger batches, slower steps)

    @property
    def latent_side(self) -> int:
        return self.unet["sample_size"]

    @property
    def image_side(self) -> int:  # the VAE halves the side in each block but the last
        return self.latent_side * 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def tokens(self) -> int:
        return self.text["max_position_embeddings"]


# probes 8, 16, 32, ...: without checkpointing an 80 GB H100 holds a few dozen 512² images, with it a few hundred
SD15 = SDSetup(SD15_UNET, SD15_VAE, SD15_TEXT, first_batch=8, max_batch=256, max_probes=7, probe_steps=2, warmup=3,
               steps=15, checkpointing_steps=5)
# the same code paths at sizes a CPU runs in seconds (--smoke)
SD15_SMOKE = SDSetup(
    {**SD15_UNET, "sample_size": 16, "cross_attention_dim": 32, "block_out_channels": (32, 64),
     "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    {**SD15_VAE, "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
     "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 32},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "max_position_embeddings": 8, "vocab_size": 1000},
    first_batch=1, max_batch=2, max_probes=2, probe_steps=1, warmup=1, steps=2, checkpointing_steps=2)


def bf16_autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")


def sd15_train_scheduler() -> DDPMScheduler:
    """SD-1.5's training noise schedule (its scheduler config): scaled-linear betas, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


class UNetTraining:
    """A UNet2DConditionModel built from config (random weights, on the device) and the trainer's step on it:
    noise + add_noise, bf16-autocast forward with SDPA attention, MSE, backward, grad clip, fused AdamW, EMA."""

    def __init__(self, setup: SDSetup, checkpointing: bool = False, compiled: bool = False):
        torch.manual_seed(0)
        with torch.device(DEVICE):  # initialised where it trains: 860M parameters are slow to init on the host
            self.unet = UNet2DConditionModel(**setup.unet)
        self.unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default: torch's scaled_dot_product_attention
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train().to(memory_format=torch.channels_last)
        self.net = torch.compile(self.unet) if compiled else self.unet
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        self.ema = EMAModel(self.unet.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4, foreach=True)
        self.scheduler = sd15_train_scheduler()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(DEVICE)

    def loss(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # t and noise drawn on the device: the trainer draws them from a CPU generator (the same numbers under
        # any world size), which at 64x64x4 per image would time the host, not the UNet
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noise = torch.randn_like(latents)
        with bf16_autocast():
            pred = self.net(self.scheduler.add_noise(latents, noise, t), t, text).sample
            return F.mse_loss(pred.float(), noise.float())

    def step(self, latents: torch.Tensor, text: torch.Tensor) -> None:
        self.loss(latents, text).backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0).item()  # the trainer reads the norm each step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())


class OnlineEncoders:
    """What train_text_to_image.py runs before the UNet each step, frozen and in bf16 weights (its weight_dtype
    under bf16 mixed precision): the VAE encoder on the images (a posterior sample times the scaling factor) and
    the text encoder on the token ids (its last hidden state)."""

    def __init__(self, setup: SDSetup):
        self.dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # fp32 on a CPU (no autocast there)
        with torch.device(DEVICE):
            self.vae = AutoencoderKL(**setup.vae).to(self.dtype).eval().requires_grad_(False)
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**setup.text)).to(self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor
        text = self.text_encoder(ids, return_dict=False)[0]
        # fp32 like a cache's: the UNet step is then the cached path's, and the difference is the encoders' work
        return latents.float().contiguous(memory_format=torch.channels_last), text.float()


def cached_inputs(setup: SDSetup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from a latent cache: latents (channels_last, as the trainer feeds them) and text embeddings."""
    side = setup.latent_side
    latents = torch.randn(batch, setup.unet["in_channels"], side, side, device=DEVICE)
    text = torch.randn(batch, setup.tokens, setup.unet["cross_attention_dim"], device=DEVICE)
    return latents.contiguous(memory_format=torch.channels_last), text


def raw_inputs(setup: SDSetup, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as a data loader hands it over: images in [-1, 1] and token ids."""
    side = setup.image_side
    images = (torch.rand(batch, 3, side, side, device=DEVICE) * 2 - 1).to(dtype)
    return images, torch.randint(0, setup.text["vocab_size"], (batch, setup.tokens), device=DEVICE)


@dataclass
class TrainingPath:
    """One way to feed the UNet: how to make a synthetic batch, and one training step on it."""
    inputs: Callable[[int], tuple]
    step: Callable[..., None]
    training: UNetTraining


def cached_path(setup: SDSetup, training: UNetTraining) -> TrainingPath:
    return TrainingPath(lambda b: cached_inputs(setup, b), training.step, training)


def online_path(setup: SDSetup, training: UNetTraining, encoders: OnlineEncoders) -> TrainingPath:
    # the data loader's decode and host-to-device copy are left out: the difference to the cached path is the
    # encoders' work on the GPU
    return TrainingPath(lambda b: raw_inputs(setup, b, encoders.dtype),
                        lambda images, ids: training.step(*encoders(images, ids)), training)


def run_steps(path: TrainingPath, batch: int, steps: int) -> None:
    inputs = path.inputs(batch)
    for _ in range(steps):
        path.step(*inputs)
    sync()


def release_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def fits(path: TrainingPath, batch: int, steps: int) -> bool:
    """Whether `steps` training steps at `batch` run without a CUDA out-of-memory error."""
    try:
        run_steps(path, batch, steps)
        return True
    except torch.cuda.OutOfMemoryError:
        pass  # the memory is released below, once the traceback (which holds the step's tensors) is gone
    path.training.optimizer.zero_grad(set_to_none=True)
    release_memory()
    return False


def largest_batch(fits_at: Callable[[int], bool], first: int, max_batch: int, max_probes: int,
                  known_too_large: int | None = None) -> tuple[int, dict]:
    """The largest batch up to max_batch for which fits_at holds (0 if none): doubling from `first` up to the
    first failure (or from a batch already known too large), then halving the gap between the largest fit and the
    smallest failure down to `first`'s step; at most max_probes tries. Returns it and each tried batch's outcome."""
    fit, too_large, probes = 0, known_too_large, {}
    while len(probes) < max_probes:
        if too_large is None and max(first, 2 * fit) <= max_batch:
            batch = max(first, 2 * fit)
        elif too_large is not None and too_large - fit > first:
            batch = fit + max(first, (too_large - fit) // 2 // first * first)
        else:
            break
        probes[batch] = "fits" if fits_at(batch) else "out of memory"
        fit, too_large = (batch, too_large) if probes[batch] == "fits" else (fit, batch)
        print(f"  batch {batch}: {probes[batch]}", flush=True)
    return fit, {str(b): outcome for b, outcome in probes.items()}


def reset_peak_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def timed(path: TrainingPath, batch: int, warmup: int, steps: int) -> dict:
    """img/s over `steps` synchronised steps after `warmup` ones, and the peak GPU memory while they ran."""
    inputs = path.inputs(batch)
    start = time.perf_counter()
    for _ in range(warmup):
        path.step(*inputs)
    warm = synced()
    reset_peak_memory()
    for _ in range(steps):
        path.step(*inputs)
    seconds = synced() - warm
    return {"batch": batch, "img_per_s": round(batch * steps / seconds, 2), "step_ms": round(seconds * 1000 / steps, 1),
            "warmup_s": round(warm - start, 1), "peak_memory_gib": peak_memory_gib()}


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of what fn runs, counted op by op (matmuls, convolutions, attention) by FlopCounterMode. On a CPU
    torch's CPU attention kernel is not counted (no formula for it); the CUDA ones are."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def unet_step_flops(training: UNetTraining, latents: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one training forward+backward of the UNet on this batch, and of the forward alone."""
    with torch.no_grad():
        forward = count_flops(lambda: training.loss(latents, text))
    both = count_flops(lambda: training.loss(latents, text).backward())
    training.optimizer.zero_grad(set_to_none=True)
    return both, forward


def utilisation(flops_per_step: float, step_ms: float) -> dict:
    """Achieved TFLOP/s and MFU against the GPU's dense bf16 peak (null where the peak is unknown: a CPU)."""
    achieved = flops_per_step / (step_ms / 1000)
    mfu = achieved / peak_flops()
    return {"achieved_tflops": round(achieved / 1e12, 3), "mfu": round(mfu, 4) if math.isfinite(mfu) else None}


def measure_cached(setup: SDSetup, training: UNetTraining, batch: int) -> dict:
    """Timing, memory and FLOPs of the cached path at `batch`."""
    figures = timed(cached_path(setup, training), batch, setup.warmup, setup.steps)
    flops, forward = unet_step_flops(training, *cached_inputs(setup, batch))
    return {**figures, "flops_per_step": flops, "forward_flops_per_step": forward,
            **utilisation(flops, figures["step_ms"])}


def model_facts(setup: SDSetup, unet: torch.nn.Module) -> dict:
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    facts = {"unet_parameters": sum(p.numel() for p in unet.parameters()),
             "block_out_channels": list(setup.unet["block_out_channels"]),
             "latents": [setup.unet["in_channels"], setup.latent_side, setup.latent_side],
             "image_side": setup.image_side, "text_tokens": setup.tokens,
             "text_width": setup.unet["cross_attention_dim"], "attention": processors,
             "precision": "bf16 autocast" if DEVICE == "cuda" else "fp32 (cpu)"}
    if DEVICE == "cuda":
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return facts


def sd15_cached_and_online(setup: SDSetup) -> Iterator[tuple[str, dict | float]]:
    """The cached path at the largest batch that fits, then the online path at that batch (or its own largest),
    on one UNet and optimizer (warm, like a run that goes on)."""
    training = UNetTraining(setup)
    yield "model", model_facts(setup, training.unet)
    cached = cached_path(setup, training)
    batch, probes = largest_batch(lambda b: fits(cached, b, setup.probe_steps), setup.first_batch, setup.max_batch,
                                  setup.max_probes)
    if not batch:
        yield "cached", {"batch": 0, "batch_search": probes}
        return
    yield "cached", {**measure_cached(setup, training, batch), "batch_search": probes}

    encoders = OnlineEncoders(setup)
    online = online_path(setup, training, encoders)
    online_batch, source, probes = batch, "the cached path's", {str(batch): "fits"}
    if not fits(online, batch, setup.probe_steps):
        online_batch, probes = largest_batch(lambda b: fits(online, b, setup.probe_steps), setup.first_batch,
                                             setup.max_batch, setup.max_probes, known_too_large=batch)
        source, probes = "its own largest", {str(batch): "out of memory", **probes}
    if not online_batch:
        yield "online", {"batch": 0, "batch_search": probes}
        return
    yield "online", measure_online(setup, training, encoders, online_batch, source, probes)


def measure_online(setup: SDSetup, training: UNetTraining, encoders: OnlineEncoders, batch: int, source: str,
                   probes: dict) -> dict:
    """Timing and memory of the online path; FLOPs of its UNet training and of its encoders, with the MFU of the
    UNet training alone (the work that remains with a latent cache) and of everything."""
    figures = timed(online_path(setup, training, encoders), batch, setup.warmup, setup.steps)
    images, ids = raw_inputs(setup, batch, encoders.dtype)
    encoder_flops = count_flops(lambda: encoders(images, ids))
    unet_flops, _ = unet_step_flops(training, *encoders(images, ids))
    parameters = {name: sum(p.numel() for p in module.parameters())
                  for name, module in (("vae_encoder", encoders.vae.encoder), ("text_encoder", encoders.text_encoder))}
    return {**figures, "batch_source": source, "batch_search": probes, "encoder_parameters": parameters,
            "flops_per_step": unet_flops + encoder_flops, "unet_flops_per_step": unet_flops,
            "encoder_flops_per_step": encoder_flops, **utilisation(unet_flops, figures["step_ms"]),
            "mfu_with_encoders": utilisation(unet_flops + encoder_flops, figures["step_ms"])["mfu"]}


def sd15_checkpointing(setup: SDSetup, cached: dict) -> dict:
    """The cached path with gradient checkpointing, at its own largest batch. MFU counts the model's FLOPs
    (those of a step without recomputation); hfu counts the recomputed forward too."""
    training = UNetTraining(setup, checkpointing=True)
    path = cached_path(setup, training)
    batch, probes = largest_batch(lambda b: fits(path, b, setup.probe_steps), setup.first_batch, setup.max_batch,
                                  setup.max_probes)
    if not batch:
        return {"batch": 0, "batch_search": probes}
    figures = timed(path, batch, setup.warmup, setup.checkpointing_steps)
    counted, _ = unet_step_flops(training, *cached_inputs(setup, batch))
    model_flops = cached["flops_per_step"] * batch / cached["batch"]  # the same FLOPs per image at any batch
    return {**figures, "batch_search": probes, "flops_per_step": counted, "model_flops_per_step": model_flops,
            **utilisation(model_flops, figures["step_ms"]), "hfu": utilisation(counted, figures["step_ms"])["mfu"],
            "img_per_s_over_cached": round(figures["img_per_s"] / cached["img_per_s"], 3)}


def sd15_compiled(setup: SDSetup, cached: dict) -> dict:
    """The cached path with torch.compile(unet) at the cached path's batch; warm-up includes the compilation."""
    training = UNetTraining(setup, compiled=True)
    figures = timed(cached_path(setup, training), cached["batch"], setup.warmup, setup.steps)
    figures["compile_and_warmup_s"] = figures.pop("warmup_s")
    return {**figures, **utilisation(cached["flops_per_step"], figures["step_ms"]),
            "img_per_s_over_eager": round(figures["img_per_s"] / cached["img_per_s"], 3)}


def sd15_bench(setup: SDSetup, variants: list[str]) -> Iterator[tuple[str, dict | float]]:
    """The SD-1.5-size figures one by one (key, value), each as soon as it is measured; the variants after the
    two paths, each on a fresh UNet once the last one's memory is released."""
    parts = {}
    for key, value in sd15_cached_and_online(setup):  # its UNet, optimizer and encoders go when it ends
        parts[key] = value
        yield key, value
    cached, online = parts.get("cached", {}), parts.get("online", {})
    if online.get("img_per_s"):
        yield "cached_over_online", round(cached["img_per_s"] / online["img_per_s"], 3)
    if not cached.get("img_per_s"):
        return
    for option, key, measure in (("checkpointing", "checkpointing", sd15_checkpointing),
                                 ("compile", "compiled", sd15_compiled)):
        if option in variants:
            release_memory()
            yield key, measure(setup, cached)


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def shapes_config(overrides: dict, smoke: bool):
    """configs/shapes.yaml with `overrides`, tracking off (MLflow is not on the GPU image, and a benchmark is no
    experiment); --smoke: batch 8 at 16 px."""
    small = {"train.batch_size": 8, "data.resolution": 16} if smoke else {}
    return load_config(Path("configs/shapes.yaml"), {**overrides, "tracking.enabled": False, **small})


def breakdown_benches(only: str, smoke: bool, result: dict, out: Path) -> None:
    n = 3 if smoke else 30
    variants = VARIANTS if only == "breakdown" else COMPILED
    for batch in (32, 256) if only == "breakdown" else (256,):
        cfg = shapes_config({"train.batch_size": batch}, smoke)
        result[f"breakdown_shapes32_b{batch}"] = step_breakdown(cfg, n, variants)
    result["breakdown_unet64_b128"] = step_breakdown(shapes_config(BIG_UNET, smoke), n, variants)
    save(result, out)


def trainer_benches(smoke: bool, result: dict, out: Path) -> None:
    """The trainer's own throughput and MFU (shapes config, 64 px UNet), then sampling."""
    shapes = shapes_config({"train.batch_size": 256}, smoke)
    result["train_shapes32_b256"] = train_bench(shapes, 4 if smoke else 200, Path("runs/gpu_check/shapes"))
    print(json.dumps(result, indent=2), flush=True)
    big = shapes_config(BIG_UNET, smoke)
    result["train_unet64_b128"] = train_bench(big, 4 if smoke else 100, Path("runs/gpu_check/big"))
    print(json.dumps(result, indent=2), flush=True)
    result["sample_shapes32_dpmpp20"] = sample_bench(Path("runs/gpu_check/shapes/model"), 16 if smoke else 1024)
    save(result, out)


def sd15_benches(smoke: bool, variants: list[str], result: dict, out: Path) -> None:
    """The SD-1.5-size figures, written to `out` as each arrives (a time limit keeps those measured)."""
    result["sd15"] = {"smoke": smoke}
    for key, value in sd15_bench(SD15_SMOKE if smoke else SD15, variants):
        result["sd15"][key] = value
        save(result, out)
        print(f"sd15 {key}: {json.dumps(value)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu_check/gpu_bench.json")
    ap.add_argument("--smoke", action="store_true", help="a few steps of each part at tiny sizes (a dry run, also on "
                                                         "a CPU)")
    ap.add_argument("--only", choices=["train", "sd15", "breakdown", "compile"],
                    help="train: the trainer's throughput and sampling; sd15: the SD-1.5-size UNet; breakdown: the "
                         "per-phase step breakdown (compile: with and without torch.compile)")
    ap.add_argument("--sd15-variants", nargs="*", choices=["checkpointing", "compile"], default=["checkpointing"],
                    help="SD-1.5 cached-path variants after the two paths (default: checkpointing)")
    args = ap.parse_args()
    out = Path(args.out)

    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
              "torch": torch.__version__}
    if args.only in ("breakdown", "compile"):
        breakdown_benches(args.only, args.smoke, result, out)
        return
    if args.only != "sd15":
        trainer_benches(args.smoke, result, out)
    if args.only != "train":
        sd15_benches(args.smoke, args.sd15_variants, result, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
