"""The training loop: read it top to bottom in one sitting.

    diffuse train --config configs/shapes.yaml [--resume]
    torchrun --nproc_per_node 4 -m pipeline.cli train --config CONFIG     (DDP: pipeline/training/distributed.py)

A pixel model denoises images; a latent model (model.vae) denoises the VAE latents of its images, which are encoded
once into a cache (pipeline/training/latents.py) and drawn from their stored posterior at every step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.config import Config
from pipeline.data.loader import TrainingData, open_training_data
from pipeline.errors import UserError
from pipeline.model.encoders import EmbeddingCache, build_encoder, context_stats, standardize
from pipeline.model.folder import load_model, save_model
from pipeline.model.network import ModelSpec, build_unet, extend_condition_channels, side_multiple
from pipeline.model.vae import VaeSpec, load_vae, scale, vae_spec
from pipeline.training import distributed
from pipeline.training.batches import batch_loader, flip_mask, random_flip
from pipeline.training.checkpoints import clear_earlier_run, latest_checkpoint
from pipeline.training.latents import latents_for
from pipeline.training.loggers import JsonlLogger, Loggers, MetricsLogger
from pipeline.training.objective import cfg_dropout, diffusion_loss, image_dropout
from pipeline.training.sample_grids import log_sample_grid
from pipeline.training.schedule import Schedule
from pipeline.training.state import TrainState, check_finite

log = logging.getLogger(__name__)
CYCLES_NEED_SQUARE = "cycles at another resolution need square data"


def make_train_scheduler(cfg: Config):
    d = cfg.diffusion
    # trailing spacing: samplers start from t = T-1, where the cosine schedule leaves no trace of the image
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                         prediction_type=d.prediction_type, clip_sample=False, timestep_spacing="trailing")


def model_spec(cfg: Config, encoder, context_dim: int, context_stats: dict | None = None,
               vae: VaeSpec | None = None) -> ModelSpec:
    """What a model built from `cfg` needs besides its UNet weights (saved as conditioning.json). A condition image
    enters as what the model denoises: RGB pixels, or a latent model's latents."""
    condition_channels = (vae.latent_channels if vae else 3) if cfg.context.image_condition else 0
    return ModelSpec(
        resolution=cfg.data.resolution, patch_size=cfg.model.patch_size, coord_channels=cfg.model.coord_channels,
        encoder=cfg.context.encoder, encoder_id=encoder.id,
        max_length=encoder.max_length, clip_path=cfg.context.clip_path, attach=cfg.context.attach,
        categories=getattr(encoder, "categories", None), context_dim=context_dim,
        prediction_type=cfg.diffusion.prediction_type, context_stats=context_stats,
        condition_channels=condition_channels, vae=vae,
    )


def unet_from_config(spec: ModelSpec, cfg: Config):
    m = cfg.model
    return build_unet(spec, m.block_out_channels, m.layers_per_block, m.attention_levels, m.attention_head_dim,
                      m.norm_num_groups, m.scale_shift)


def unet_from_init(init, spec: ModelSpec, cfg: Config):
    """train.init_from: the given model's UNet, extended with the condition channels this config adds. Its
    architecture, encoder and noise schedule must be the ones this config describes."""
    keys = ("resolution", "patch_size", "coord_channels", "encoder", "encoder_id", "max_length", "attach",
            "context_dim", "prediction_type")
    differ = [f"context/data {k}: {getattr(init.spec, k)} vs {getattr(spec, k)}" for k in keys
              if getattr(init.spec, k) != getattr(spec, k)]
    vae_of = lambda s: s.vae.sha256[:12] if s.vae else "none (pixel model)"  # noqa: E731
    if vae_of(init.spec) != vae_of(spec):
        differ.append(f"model.vae: {vae_of(init.spec)} vs {vae_of(spec)}")
    if init.scheduler_config.get("beta_schedule") != cfg.diffusion.beta_schedule:
        differ.append(f"diffusion.beta_schedule: {init.scheduler_config.get('beta_schedule')} vs "
                      f"{cfg.diffusion.beta_schedule}")
    unet, _ = extend_condition_channels(init.unet, init.spec, spec.condition_channels)
    fresh = dict(unet_from_config(spec, cfg).config)
    plain = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples and lists compare equal
    differ += [f"model {k}: {plain(unet.config[k])} vs {plain(v)}" for k, v in fresh.items()
               if not k.startswith("_") and plain(unet.config.get(k)) != plain(v)]
    if differ:
        raise UserError(f"train.init_from {init.path} does not match this config ({'; '.join(differ)}): set the "
                        "config's model, data and context sections to the init model's (its train_config.yaml)")
    return unet


def prepare_context(cfg: Config, captions: list[str], labels: list[str] | None):
    """Encode every unique caption once (through the disk cache) into a table; row 0 is the null context.
    Returns (encoder, table, row index of each training item)."""
    c = cfg.context
    if c.encoder == "category":
        encoder = build_encoder("category", categories=labels)
        table = encoder.encode([""] + encoder.categories)
        row = {lab: i + 1 for i, lab in enumerate(encoder.categories)}
        return encoder, table, torch.tensor([row[lab] for lab in labels])
    encoder = build_encoder(c.encoder, c.max_length, c.clip_path)
    unique = [""] + sorted(set(captions) - {""})
    table, encoded_now = EmbeddingCache(c.cache_dir, encoder.id).table(encoder, unique)
    overlong = sum(encoder.overlong(u) for u in unique[:2000])  # a sample: tokenizing millions is not free
    if overlong:
        log.warning("%d captions are longer than %d tokens and were truncated", overlong, c.max_length)
    log.info("context: %d unique captions (%d encoded now, the rest from the cache)", len(unique), encoded_now)
    row = {cap: i for i, cap in enumerate(unique)}
    return encoder, table, torch.tensor([row[cap] for cap in captions])


def check_image_sizes(cfg: Config, data: TrainingData, vae: VaeSpec | None = None) -> None:
    """Every image size (data.resolution, or each aspect-ratio bucket) must fit the UNet: each side a multiple of
    what it downsamples by (times a latent model's VAE downsampling). And a cycle's lower resolution (an
    area-downsampled square) needs square images."""
    m = cfg.model
    multiple = side_multiple(vae.downsample if vae else 1, m.patch_size, len(m.block_out_channels))
    misfits = [f"{w}x{h}" for h, w in data.image_sizes if h % multiple or w % multiple]
    if misfits:
        through = f"the VAE's {vae.downsample}x downsampling x " if vae else ""
        raise UserError(f"{data.dataset.path}: images of {', '.join(misfits)} px do not fit the model, whose input "
                        f"sides must be multiples of {multiple} ({through}model.patch_size {m.patch_size} x "
                        "2^(levels-1), levels = len(model.block_out_channels)): re-ingest with ingest.buckets.step "
                        f"a multiple of {multiple}, or change model.patch_size / model.block_out_channels")
    lower = [f"train.cycles[{i}].resolution" for i, c in enumerate(cfg.train.cycles)
             if c.resolution not in (None, cfg.data.resolution)]
    if lower and any(h != w for h, w in data.image_sizes):
        raise UserError(f"{', '.join(lower)}: {CYCLES_NEED_SQUARE}, and {data.dataset.path} holds images of other "
                        "aspect ratios (ingest.buckets): leave the cycles' resolution out, or re-ingest with "
                        "--no-buckets")


def train(cfg: Config, resume: bool = False, logger: MetricsLogger | None = None, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Train per `cfg`; returns the final model directory (run_dir/model)."""
    t = cfg.train
    schedule = Schedule(t, cfg.data.resolution)
    run_dir = Path(cfg.run_dir)
    # under torchrun: this rank's share of every global batch; else the whole batch
    part = distributed.setup({f"train.cycles[{i}].batch_size" if t.cycles and t.cycles[i].batch_size
                              else "train.batch_size": c.batch_size for i, c in enumerate(schedule.cycles)})
    clear_earlier_run(run_dir, resume, overwrite, ("checkpoints", "model", "metrics.jsonl"), delete=part.is_main)
    part.barrier()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.device(part)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    jsonl = JsonlLogger(run_dir)
    sample_every = cfg.tracking.sample_every if logger and part.is_main else 0  # grids only for a tracking logger
    logger = Loggers(jsonl, *([logger] if logger else [])) if part.is_main else Loggers()  # rank 0 logs

    vae_info = vae_spec(cfg.model.vae) if cfg.model.vae is not None else None  # a latent model's VAE, checked
    # data and context: images decoded once, captions encoded once (rank 0 first: it fills the disk caches)
    with part.main_first():
        data = open_training_data(cfg.data, cfg.ingest, conditions=cfg.context.image_condition)
        check_image_sizes(cfg, data, vae_info)
        encoder, table, caption_rows = prepare_context(cfg, data.captions, data.labels)
    train_items, vae, encoded = data.images, None, None
    if vae_info is not None:  # a latent model: its images as VAE latents, encoded once into the cache
        vae = load_vae(cfg.model.vae, device)
        encoded = latents_for(cfg, data, vae, vae_info, part, progress)
        train_items = encoded.items
    init = load_model(t.init_from) if t.init_from else None  # fine-tune (or extend) an existing model
    stats = context_stats(table, cfg.context.whiten) if cfg.context.standardize and table.tokens is not None else None
    if init is not None:
        stats = init.spec.context_stats  # the context scaled as the weights learned it
    table = standardize(table, stats)
    table = type(table)(*[None if a is None else a.to(device) for a in table.astuple()])
    n = len(data.captions)

    spec = model_spec(cfg, encoder, 0 if table.tokens is None else table.tokens.shape[-1], stats, vae_info)
    unet = (unet_from_init(init, spec, cfg) if init else unet_from_config(spec, cfg)).to(device)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    channels_last = t.channels_last if t.channels_last is not None else device.type == "cuda"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = make_train_scheduler(cfg)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    # fused on the CPU too: one kernel over all parameters, half the time of the per-tensor loop
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_factor(step))

    def new_ema() -> EMAModel:
        # foreach: one fused update for all tensors (GPU: 10.5 -> 2.4 ms a step at batch 32, BENCHMARKS.md)
        return EMAModel(unet.parameters(), decay=t.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True)

    # all training randomness: t, noise, CFG dropout, posterior samples
    state = TrainState(unet, optimizer, lr_schedule, new_ema(), torch.Generator().manual_seed(cfg.seed))
    generator = state.generator
    step = 0

    ckpt = distributed.checkpoint_visible(part, latest_checkpoint(run_dir)) if resume else None
    if resume and ckpt is None:
        log.warning("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
    if ckpt is not None:
        step = state.restore(ckpt, device)
        if part.is_main:
            jsonl.truncate_after(step)
        log.info("resumed from %s (step %d)", ckpt, step)
    else:
        logger.log_params({"config": cfg.model_dump(mode="json"), "num_items": n, "dataset_version": data.version,
                           "parameters": sum(p.numel() for p in unet.parameters())}
                          | ({"latent_cache": str(encoded.folder), "latents_encoded": encoded.encoded,
                              "vae_sha256": vae_info.sha256} if encoded else {}))
    if part.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    ddp = distributed.wrap(unet, part)  # the unet itself in a single process
    model = torch.compile(ddp, mode=t.compile_mode) if t.compile else ddp

    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if device.type == "cpu" and t.precision == "bf16" and not (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        log.warning("train.precision is bf16 but this CPU has no native bf16 (AVX512-BF16 or AMX): autocast will "
                    "emulate it, likely slower than fp32; set train.precision: fp32 (or auto) here")
    last_good = ckpt

    def checkpoint() -> Path:
        if not part.is_main:
            return part.from_main(None)  # waits until rank 0 has written it
        return part.from_main(state.save(run_dir, step, t.keep_last, samples_seen=schedule.samples_before(step)))

    def loader_from(step: int):  # the training stream from this step's position, in this step's batch size
        return batch_loader(train_items, cfg.seed, schedule.samples_before(step), schedule.batch_size_at(step),
                            cfg.data.loader_workers, pin_memory=device.type == "cuda", part=part)

    batches = loader_from(step)
    bar = _progress(t.max_steps, step, progress and part.is_main)
    tick, tick_step = time.perf_counter(), step
    while step < t.max_steps:
        if schedule.restarts_at(step):  # a warm restart: the new cycle starts like a fine-tune of the last one
            optimizer.state.clear()
            state.ema = new_ema()
            if schedule.batch_size_at(step) != schedule.batch_size_at(step - 1):
                del batches  # stops its worker processes
                batches = loader_from(step)
        for micro in range(t.grad_accum):
            idx, pixels, cond_pixels = next(batches)
            position = schedule.samples_before(step) + micro * schedule.batch_size_at(step)
            if vae_info is not None:  # pixels: cached posteriors (B, V, 2, C, h, w)
                x0, cond = _latent_input(pixels, cond_pixels, vae_info, cfg.seed, position, generator, device, part,
                                         channels_last)
            else:
                side = schedule.resolution_at(step)
                x0 = _to_model_input(pixels, cfg, position, device, part, channels_last, side)
                cond = None if cond_pixels is None else _to_model_input(cond_pixels, cfg, position, device, part,
                                                                         channels_last, side)
            rows = cfg_dropout(caption_rows[idx], cfg.context.cfg_dropout, 0, generator, part)
            if cond is not None:  # the condition image has its own dropout, for image guidance
                cond = image_dropout(cond, data.has_condition[idx], cfg.context.image_dropout, generator, part)
            with distributed.accumulating(ddp, last_micro_batch=micro == t.grad_accum - 1):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = diffusion_loss(model, spec, scheduler, x0, table.index(rows.to(device)), generator,
                                          cfg.diffusion.loss_weighting, cfg.diffusion.snr_gamma, part, cond)
                (loss / t.grad_accum).backward()
        loss_value = part.mean(loss)  # the global batch's loss: every rank takes the same decisions below
        check_finite(loss_value, step, last_good, "Lower train.lr or raise train.warmup_steps, then resume or "
                     "restart.")
        grad_norm = state.update(t.grad_clip)
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            now = time.perf_counter()
            img_s = (schedule.samples_before(step) - schedule.samples_before(tick_step)) / max(now - tick, 1e-9)
            tick, tick_step = now, step
            metrics = {"loss": loss_value, "lr": lr_schedule.get_last_lr()[0], "grad_norm": grad_norm,
                       "img_per_s": img_s}
            logger.log_metrics(metrics, step)
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:.0f}")
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            last_good = checkpoint()
        if sample_every and (step % sample_every == 0 or step == t.max_steps):
            # sampled at the side this step trained at (a cycle's resolution)
            trained_at = spec.model_copy(update={"resolution": schedule.resolution_after(step)})
            log_sample_grid(cfg, step, unet, state.ema, scheduler, trained_at, data.captions, logger, vae)
    bar.close()

    if not part.is_main:
        return part.from_main(None)  # waits for rank 0's model
    state.ema.copy_to(unet.parameters())  # the shipped model carries the EMA weights
    unet = unet.to(memory_format=torch.contiguous_format)
    return part.from_main(save_model(run_dir / "model", unet, scheduler, spec, cfg.model_dump(mode="json"),
                                     vae_dir=cfg.model.vae))


def _to_model_input(pixels: torch.Tensor, cfg: Config, position: int, device, part,
                    channels_last: bool, side: int) -> torch.Tensor:
    """uint8 images to [-1, 1] on the device, area-downsampled to `side` pixels when a cycle trains at that
    resolution (square images only); an image and its condition image get the same random flip."""
    x = pixels.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if side != cfg.data.resolution:
        if x.shape[-2] != x.shape[-1]:
            raise UserError(f"train.cycles: {CYCLES_NEED_SQUARE} (this batch is {x.shape[-1]}x{x.shape[-2]} px)")
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="area")
    if cfg.data.random_flip:
        x = random_flip(x, cfg.seed, position, part)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _latent_input(posteriors: torch.Tensor, cond_posteriors: torch.Tensor | None, vae: VaeSpec, seed: int,
                  position: int, generator: torch.Generator, device, part, channels_last: bool):
    """A latent model's batch: one draw z = mean + std * noise from each item's cached posterior (of its mirror
    image where the item is flipped, as _to_model_input flips pixels), scaled as diffusers does; the condition
    image enters as its posterior mean, flipped with its item. Noise from the training generator, for the whole
    global batch (`part` keeps this rank's rows): a resumed run draws the same."""
    rows = torch.arange(len(posteriors))
    variant = flip_mask(len(posteriors), seed, position, part).long() if posteriors.shape[1] == 2 else 0
    mean, std = posteriors[rows, variant].unbind(1)
    noise = part.take(torch.randn((len(mean) * part.world, *mean.shape[1:]), generator=generator))
    x0 = scale(mean + std * noise, vae).to(device, non_blocking=True)
    cond = None
    if cond_posteriors is not None:
        cond = scale(cond_posteriors[rows, variant, 0], vae).to(device, non_blocking=True)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    return x0, cond


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
