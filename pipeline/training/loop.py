"""The training loop: read it top to bottom in one sitting.

    diffuse train --config configs/shapes.yaml [--resume]
    torchrun --nproc_per_node 4 -m pipeline.cli train --config CONFIG     (DDP: pipeline/training/distributed.py)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.config import Config
from pipeline.data.loader import TrainingData, open_training_data
from pipeline.errors import TrainingDiverged, UserError
from pipeline.model.encoders import EmbeddingCache, build_encoder, context_stats, standardize
from pipeline.model.folder import load_model, save_model
from pipeline.model.network import ModelSpec, build_unet, extend_condition_channels
from pipeline.training import distributed
from pipeline.training.batches import batch_loader, random_flip
from pipeline.training.checkpoints import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.training.loggers import JsonlLogger, Loggers, MetricsLogger
from pipeline.training.objective import cfg_dropout, diffusion_loss, image_dropout
from pipeline.training.sample_grids import log_sample_grid
from pipeline.training.schedule import Schedule

log = logging.getLogger(__name__)
CYCLES_NEED_SQUARE = "cycles at another resolution need square data"


def make_train_scheduler(cfg: Config):
    d = cfg.diffusion
    # trailing spacing: samplers start from t = T-1, where the cosine schedule leaves no trace of the image
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                         prediction_type=d.prediction_type, clip_sample=False, timestep_spacing="trailing")


def model_spec(cfg: Config, encoder, context_dim: int, context_stats: dict | None = None) -> ModelSpec:
    """What a model built from `cfg` needs besides its UNet weights (saved as conditioning.json)."""
    return ModelSpec(
        resolution=cfg.data.resolution, patch_size=cfg.model.patch_size, coord_channels=cfg.model.coord_channels,
        encoder=cfg.context.encoder, encoder_id=encoder.id,
        max_length=encoder.max_length, clip_path=cfg.context.clip_path, attach=cfg.context.attach,
        categories=getattr(encoder, "categories", None), context_dim=context_dim,
        prediction_type=cfg.diffusion.prediction_type, context_stats=context_stats,
        condition_channels=3 if cfg.context.image_condition else 0,
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


def check_image_sizes(cfg: Config, data: TrainingData) -> None:
    """Images of other sides than data.resolution (aspect-ratio buckets) must fit the UNet: each side a multiple
    of what it downsamples by. And a cycle's lower resolution (an area-downsampled square) needs square images."""
    m = cfg.model
    multiple = m.patch_size * 2 ** (len(m.block_out_channels) - 1)
    misfits = [f"{w}x{h}" for h, w in data.image_sizes if h % multiple or w % multiple]
    if misfits:
        raise UserError(f"{data.dataset.path}: images of {', '.join(misfits)} px do not fit the UNet, whose input "
                        f"sides must be multiples of {multiple} (model.patch_size {m.patch_size} x 2^(levels-1), "
                        "levels = len(model.block_out_channels)): re-ingest with ingest.buckets.step a multiple of "
                        f"{multiple}, or change model.patch_size / model.block_out_channels")
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
    if not resume and checkpoint_dirs(run_dir):
        if not overwrite:
            raise UserError(f"{run_dir} holds checkpoints of an earlier run: add --resume to continue it, or "
                            "--overwrite to start again (its checkpoints, metrics and model are deleted)")
        for stale in ("checkpoints", "model", "metrics.jsonl") if part.is_main else ():
            path = run_dir / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
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

    # data and context: images decoded once, captions encoded once (rank 0 first: it fills the disk caches)
    with part.main_first():
        data = open_training_data(cfg.data, cfg.ingest, conditions=cfg.context.image_condition)
        check_image_sizes(cfg, data)
        encoder, table, caption_rows = prepare_context(cfg, data.captions, data.labels)
    init = load_model(t.init_from) if t.init_from else None  # fine-tune (or extend) an existing model
    stats = context_stats(table, cfg.context.whiten) if cfg.context.standardize and table.tokens is not None else None
    if init is not None:
        stats = init.spec.context_stats  # the context scaled as the weights learned it
    table = standardize(table, stats)
    table = type(table)(*[None if a is None else a.to(device) for a in table.astuple()])
    n = len(data.captions)

    spec = model_spec(cfg, encoder, 0 if table.tokens is None else table.tokens.shape[-1], stats)
    unet = (unet_from_init(init, spec, cfg) if init else unet_from_config(spec, cfg)).to(device)
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

    ema = new_ema()
    generator = torch.Generator().manual_seed(cfg.seed)  # all training randomness: t, noise, CFG dropout
    step = 0

    ckpt = distributed.checkpoint_visible(part, latest_checkpoint(run_dir)) if resume else None
    if resume and ckpt is None:
        log.warning("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
    if ckpt is not None:
        unet_sd, ema_sd, state = load_checkpoint(ckpt)
        unet.load_state_dict(unet_sd)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        names = [k for k, _ in unet.named_parameters()]
        ema.load_state_dict(state["ema"] | {"shadow_params": [ema_sd[k].to(device) for k in names]})
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        if part.is_main:
            jsonl.truncate_after(step)
        log.info("resumed from %s (step %d)", ckpt, step)
    else:
        logger.log_params({"config": cfg.model_dump(mode="json"), "num_items": n, "dataset_version": data.version,
                           "parameters": sum(p.numel() for p in unet.parameters())})
    if part.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    ddp = distributed.wrap(unet, part)  # the unet itself in a single process
    model = torch.compile(ddp) if t.compile else ddp

    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    if device.type == "cpu" and t.precision == "bf16" and not (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        log.warning("train.precision is bf16 but this CPU has no native bf16 (AVX512-BF16 or AMX): autocast will "
                    "emulate it, likely slower than fp32; set train.precision: fp32 (or auto) here")
    last_good = ckpt

    def checkpoint() -> Path:
        if not part.is_main:
            return part.from_main(None)  # waits until rank 0 has written it
        state = {
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
            "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
            "samples_seen": schedule.samples_before(step),
        }
        names = [k for k, _ in unet.named_parameters()]
        ema_sd = {k: p.detach().cpu() for k, p in zip(names, ema.shadow_params, strict=True)}
        unet_sd = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        return part.from_main(save_checkpoint(run_dir, step, unet_sd, ema_sd, state, t.keep_last))

    def loader_from(step: int):  # the training stream from this step's position, in this step's batch size
        return batch_loader(data.images, cfg.seed, schedule.samples_before(step), schedule.batch_size_at(step),
                            cfg.data.loader_workers, pin_memory=device.type == "cuda", part=part)

    batches = loader_from(step)
    bar = _progress(t.max_steps, step, progress and part.is_main)
    tick, tick_step = time.perf_counter(), step
    while step < t.max_steps:
        if schedule.restarts_at(step):  # a warm restart: the new cycle starts like a fine-tune of the last one
            optimizer.state.clear()
            ema = new_ema()
            if schedule.batch_size_at(step) != schedule.batch_size_at(step - 1):
                del batches  # stops its worker processes
                batches = loader_from(step)
        for micro in range(t.grad_accum):
            idx, pixels, cond_pixels = next(batches)
            position = schedule.samples_before(step) + micro * schedule.batch_size_at(step)
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
        if not math.isfinite(loss_value):
            where = f"the last good checkpoint {last_good} is intact" if last_good else "no checkpoint was written"
            raise TrainingDiverged(f"loss became {loss_value} at step {step + 1}; training stopped and {where}. "
                                   "Lower train.lr or raise train.warmup_steps, then resume or restart.")
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip).item()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
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
            log_sample_grid(cfg, step, unet, ema, scheduler, trained_at, data.captions, logger)
    bar.close()

    if not part.is_main:
        return part.from_main(None)  # waits for rank 0's model
    ema.copy_to(unet.parameters())  # the shipped model carries the EMA weights
    unet = unet.to(memory_format=torch.contiguous_format)
    return part.from_main(save_model(run_dir / "model", unet, scheduler, spec, cfg.model_dump(mode="json")))


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


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
