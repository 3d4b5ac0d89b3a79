"""`diffuse train-vae`: a diffusers AutoencoderKL trained on a dataset's train split, for a latent model's latents.

    diffuse train-vae --config CONFIG [--resume | --overwrite]      -> RUN_DIR/vae/ (AutoencoderKL.from_pretrained)

The loss is Stable Diffusion's without its perceptual and adversarial terms (their networks' weights are not
local): reconstruction (L1 or L2, per pixel) + `vae.kl_weight` x KL(posterior || N(0, 1)), the KL summed over the
latent and divided by the pixels as the reconstruction is, so the weight means what it means for SD's VAE.
Checkpoints and exact resume work as for `diffuse train` (pipeline/training/checkpoints.py). The shipped VAE carries
the EMA weights and the scaling factor 1 / std of its latents on the train split (as SD's 0.18215 was chosen); its
reconstruction PSNR / SSIM on the eval split are written to RUN_DIR/vae_eval.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from pipeline.config import Config, TrainConfig
from pipeline.data.loader import open_training_data
from pipeline.errors import UserError
from pipeline.images import arrays_to_tensor, channels_first, grid, to_uint8
from pipeline.model.vae import posterior
from pipeline.training.batches import batch_loader, random_flip
from pipeline.training.checkpoints import clear_earlier_run, latest_checkpoint
from pipeline.training.loggers import JsonlLogger, Loggers, MetricsLogger
from pipeline.training.schedule import Schedule
from pipeline.training.state import TrainState, check_finite

log = logging.getLogger(__name__)
GRID_IMAGES = 8


def build_vae(cfg: Config) -> AutoencoderKL:
    v = cfg.vae
    levels = len(v.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(v.block_out_channels),
                         layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                         norm_num_groups=v.norm_num_groups, sample_size=cfg.data.resolution,
                         mid_block_add_attention=v.mid_block_attention)


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, noise: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, dict]:
    """Reconstruction of a posterior sample (z = mean + std * noise) + kl_weight x KL, both per pixel."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mean + posterior.std * noise).sample.float()
    err = (recon - x).abs() if cfg.vae.reconstruction_loss == "l1" else (recon - x) ** 2
    rec = err.mean()
    kl = posterior.kl().mean() / x[0].numel()
    return rec + cfg.vae.kl_weight * kl, {"reconstruction": rec.item(), "kl": kl.item()}


def _eval_rows(data) -> tuple[np.ndarray, str]:
    m = data.dataset.manifest
    rows = np.flatnonzero((m["split"] == "eval").to_numpy())
    if len(rows):
        return rows, "eval split"
    return data.images.rows, "train split (the dataset has no eval split: not a held-out measure)"


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> uint8 (n, 3, H, W) through the posterior mean (what a latent model's images go
    through)."""
    out = []
    for i in range(0, len(pixels), batch_size):
        mean, _ = posterior(vae, arrays_to_tensor(pixels[i:i + batch_size]))
        out.append(to_uint8(vae.decode(mean).sample.float()).cpu())
    return torch.cat(out)


def reconstruction_metrics(original: np.ndarray, reconstructed: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, per image, averaged) and SSIM of uint8 reconstructions against the originals."""
    target = channels_first(original).float() / 255
    pred = reconstructed.float() / 255
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0)
    return {"psnr": float(psnr.clamp(max=100).mean()), "ssim": float(ssim)}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, pixels: np.ndarray) -> float:
    """1 / std of the posterior samples of these images: the scaling that gives the latents unit variance. One
    factor for all channels, as Stable Diffusion's: per-channel standardisation (config latents_mean / latents_std,
    which scale() also reads) measured worse on the shapes data (BENCHMARKS.md, findings)."""
    z = []
    g = torch.Generator().manual_seed(0)
    for i in range(0, len(pixels), 32):
        mean, std = posterior(vae, arrays_to_tensor(pixels[i:i + 32]))
        z.append((mean + std * torch.randn(mean.shape, generator=g).to(mean.device)).float().cpu())
    return float(1.0 / torch.cat(z).std())


def train_vae(cfg: Config, resume: bool = False, logger: MetricsLogger | None = None, progress: bool = True,
              overwrite: bool = False) -> Path:
    """Train per `cfg.vae` on `cfg.data`; returns RUN_DIR/vae."""
    v = cfg.vae
    run_dir = Path(cfg.run_dir)
    clear_earlier_run(run_dir, resume, overwrite, ("checkpoints", "vae", "metrics.jsonl", "samples"))
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if v.num_threads:
        torch.set_num_threads(v.num_threads)
    torch.manual_seed(cfg.seed)
    jsonl = JsonlLogger(run_dir)
    logger = Loggers(jsonl, *([logger] if logger else []))

    data = open_training_data(cfg.data, cfg.ingest)
    downsample = v.downsample
    if cfg.data.resolution % downsample:
        raise UserError(f"data.resolution {cfg.data.resolution} is not divisible by the VAE's downsampling "
                        f"{downsample} (2^(levels-1) of vae.block_out_channels)")
    eval_rows, eval_on = _eval_rows(data)
    eval_rows = eval_rows[: v.eval_items]
    eval_pixels = _square(data.dataset, eval_rows, cfg.data.resolution)

    vae = build_vae(cfg).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=v.lr, weight_decay=v.weight_decay, fused=True)
    schedule = Schedule(TrainConfig(batch_size=v.batch_size, lr=v.lr, warmup_steps=v.warmup_steps,
                                    max_steps=v.max_steps), cfg.data.resolution)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_factor(step))
    ema = EMAModel(vae.parameters(), decay=v.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)
    generator = torch.Generator().manual_seed(cfg.seed)  # the posterior samples
    state = TrainState(vae, optimizer, lr_schedule, ema, generator, weights_name="vae")
    step = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
    if ckpt is not None:
        step = state.restore(ckpt, device)
        jsonl.truncate_after(step)
        log.info("resumed from %s (step %d)", ckpt, step)
    else:
        logger.log_params({"config": cfg.model_dump(mode="json"), "num_items": len(data.images),
                           "dataset_version": data.version, "parameters": sum(p.numel() for p in vae.parameters()),
                           "eval_on": eval_on})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    bf16 = v.precision == "bf16" or (v.precision == "auto" and device.type == "cuda")

    def sample_grid() -> None:  # originals over their reconstructions, EMA weights (restored after)
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
        vae.eval()
        try:
            recon = reconstruct(vae, eval_pixels[:GRID_IMAGES])
        finally:
            ema.restore(vae.parameters())
            vae.train()
        originals = channels_first(eval_pixels[:GRID_IMAGES])
        out = run_dir / "samples" / f"step-{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid(torch.cat([originals, recon]), cols=len(originals)).save(out)
        logger.log_image(out, step)

    batches = batch_loader(data.images, cfg.seed, schedule.samples_before(step), v.batch_size,
                           cfg.data.loader_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=v.max_steps, initial=step, disable=not progress, desc="train-vae", unit="step",
               dynamic_ncols=True)
    tick, tick_step, last_good = time.perf_counter(), step, ckpt
    vae.train()
    while step < v.max_steps:
        _, pixels, _ = next(batches)
        x = pixels.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if cfg.data.random_flip:
            x = random_flip(x, cfg.seed, schedule.samples_before(step))
        latent_shape = (len(x), v.latent_channels, x.shape[-2] // downsample, x.shape[-1] // downsample)
        noise = torch.randn(latent_shape, generator=generator).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, parts = vae_loss(vae, x, noise, cfg)
        check_finite(loss.item(), step, last_good, "Lower vae.lr or vae.kl_weight, then resume or restart.")
        loss.backward()
        grad_norm = state.update(v.grad_clip)
        step += 1
        bar.update(1)
        if step % v.log_every == 0 or step == v.max_steps:
            now = time.perf_counter()
            img_s = (step - tick_step) * v.batch_size / max(now - tick, 1e-9)
            tick, tick_step = now, step
            logger.log_metrics({"loss": loss.item(), **parts, "lr": lr_schedule.get_last_lr()[0],
                                "grad_norm": grad_norm, "img_per_s": img_s}, step)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
        if step % v.checkpoint_every == 0 or step == v.max_steps:
            last_good = state.save(run_dir, step, v.keep_last)
        if (v.sample_every and step % v.sample_every == 0) or step == v.max_steps:
            sample_grid()
    bar.close()

    ema.copy_to(vae.parameters())  # the shipped VAE carries the EMA weights
    vae.eval()
    train_sample = _square(data.dataset, data.images.rows[:1024], cfg.data.resolution)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train_sample))
    metrics = reconstruction_metrics(eval_pixels, reconstruct(vae, eval_pixels))
    logger.log_metrics({f"eval/{k}": val for k, val in metrics.items()}, step)
    (run_dir / "vae_eval.json").write_text(json.dumps(
        {**metrics, "items": len(eval_rows), "measured_on": eval_on, "scaling_factor": vae.config.scaling_factor,
         "dataset_version": data.version}, indent=2) + "\n")
    log.info("reconstruction on the %s: PSNR %.2f dB, SSIM %.4f", eval_on, metrics["psnr"], metrics["ssim"])
    return _save(vae, run_dir / "vae")


def _square(ds, rows: np.ndarray, side: int) -> np.ndarray:
    """Images of one size for the metrics and grids: as stored, or square crops of aspect-ratio buckets."""
    return ds.square_images(rows, side) if ds.is_bucketed else ds.images(rows)


def _save(vae: AutoencoderKL, out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
