"""The one configuration system: YAML files validated by pydantic, with errors a user can act on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SamplingConfig(_Strict):
    """How images are sampled, declared once: the defaults of `diffuse sample`, batch generation (a prompt added
    without them), the pyfunc and the evaluation protocol."""

    sampler: Literal["dpmpp", "ddim", "ddpm"] = Field("dpmpp", description="DPM-Solver++ (2M), DDIM or DDPM")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(4.0, ge=0, le=50, description="classifier-free guidance scale of the text (1 = off)")


class DataConfig(_Strict):
    path: Path = Field(description="prepared dataset (diffuse data ingest) or imagefolder with metadata.jsonl")
    caption_column: str = "text"
    label_column: str | None = Field(None, description="class label column, for encoder: category")
    condition_column: str | None = Field(None, description="metadata column naming each item's condition image "
                                         "file, e.g. conditioning_image as in diffusers' ControlNet scripts")
    resolution: int = Field(32, ge=8, le=1024)
    random_flip: bool = Field(False, description="mirror images left-right at random (off when captions say "
                              "left/right)")
    loader_workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes reading the shards")
    prepared_cache: Path = Field(Path(".cache/prepared"), description="where a raw imagefolder is ingested once")
    latent_cache: Path | None = Field(None, description="latent model (model.vae): where the items' VAE latents "
                                      "are cached; default: DATASET.latents beside the prepared dataset")


SAMPLING = SamplingConfig()  # the defaults, for code that samples without a config file
SAMPLERS: tuple[str, ...] = get_args(SamplingConfig.model_fields["sampler"].annotation)


class BucketConfig(_Strict):
    """Aspect-ratio buckets (pipeline/data/buckets.py): each image is prepared at the bucket size closest to its
    own aspect ratio, every bucket about the area of the square resolution x resolution, instead of being
    centre-cropped to that square."""

    enabled: bool = Field(False, description="off: every image centre-cropped to the square")
    step: int = Field(64, ge=1, description="bucket sides are multiples of this (and of what the UNet "
                      "downsamples by: model.patch_size x 2^(levels-1))")
    max_side: int | None = Field(None, ge=1, description="longest bucket side; default: 2 x resolution")
    max_aspect: float = Field(2.0, ge=1.0, description="longest / shortest side of a bucket")


class IngestConfig(_Strict):
    """`diffuse data ingest`: what makes an item unusable, and how the prepared dataset is laid out."""

    max_pixels: int = Field(89_478_485, ge=1, description="larger images are refused (decompression bombs)")
    min_size: int = Field(16, ge=1, description="images with a shorter side are refused")
    max_caption_chars: int = Field(1000, ge=1)
    near_duplicate_distance: int = Field(4, ge=0, le=16, description="perceptual-hash bits that may differ")
    near_duplicates: Literal["quarantine", "flag"] = Field(
        "quarantine", description="quarantine near duplicates, or keep them flagged (near_duplicate_of)")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="share of items held out for evaluation")
    shard_mb: int = Field(256, ge=1, le=4096, description="largest image shard, MB")
    workers: int | None = Field(None, ge=1, description="decode processes; default: all cores")
    chunk_size: int = Field(2048, ge=1, description="items decoded per batch of work (bounds memory)")
    doodles: bool = Field(False, description="derive a doodle (pipeline/data/doodle.py) for every item without a "
                          "condition image, so any image-text set can train a sketch model")
    buckets: BucketConfig = Field(BucketConfig(), description="aspect-ratio buckets instead of square crops")

    def settings(self, exclude: set[str] | None = None) -> dict:
        """The settings as JSON (dataset.json, cache keys). `buckets` only when enabled: a square-crop dataset
        records what it recorded before buckets existed."""
        return self.model_dump(mode="json", exclude=(exclude or set()) | (set() if self.buckets.enabled
                                                                          else {"buckets"}))


# `diffuse data validate` checks and whether a failure stops the pipeline by default (hard: exit 1) or warns (soft)
VALIDATION_CHECKS = {
    "ids_present": "hard", "ids_unique": "hard", "captions_present": "hard", "captions_not_blank": "hard",
    "caption_length": "hard", "image_caption_pairs_unique": "hard", "split_values": "hard",
    "shard_rows_unique": "hard", "item_count": "hard", "shards_match_manifest": "hard", "resolution": "hard",
    "image_shape": "hard", "quarantine_rate": "hard", "exact_duplicate_rate": "soft",
    "near_duplicate_rate": "soft", "near_constant_share": "soft", "caption_vocabulary": "soft",
}


class ValidationConfig(_Strict):
    """The data gate of `diffuse data validate` (pipeline/data/validation.py): thresholds and hard/soft per check."""

    resolution: int | None = Field(None, ge=8, le=2048, description="expected image side; default: data.resolution "
                                   "of the same config file, else only dataset.json and shards must agree")
    min_items: int = Field(1, ge=1)
    caption_min_chars: int = Field(1, ge=0)
    caption_max_chars: int = Field(1000, ge=1)
    max_quarantine_rate: float = Field(0.05, ge=0, le=1, description="share of source items quarantined as "
                                       "unusable (duplicates are counted by their own rates)")
    max_exact_duplicate_rate: float = Field(0.1, ge=0, le=1, description="share of source items that repeat an "
                                            "earlier (image bytes, caption) pair")
    max_near_duplicate_rate: float = Field(0.1, ge=0, le=1, description="share of source items with a "
                                           "perceptual-hash near duplicate (quarantined or flagged)")
    near_constant_std: float = Field(2.0, ge=0, description="an image whose pixel std (0..255) is below this "
                                     "is near-constant (blank)")
    max_near_constant_share: float = Field(0.01, ge=0, le=1)
    min_caption_vocabulary: int = Field(10, ge=0, description="distinct lower-case words over all captions")
    severity: dict[str, Literal["hard", "soft", "off"]] = Field(
        {}, description="per check: hard (exit 1), soft (warn) or off; defaults: " +
        ", ".join(f"{k}={v}" for k, v in VALIDATION_CHECKS.items()))

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.severity) - set(VALIDATION_CHECKS))
        if unknown:
            raise ValueError(f"unknown checks in validation.severity: {unknown}; known: {list(VALIDATION_CHECKS)}")
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError("caption_min_chars is larger than caption_max_chars")
        return self

    def severity_of(self, check: str) -> str:
        return self.severity.get(check, VALIDATION_CHECKS[check])


class ReportConfig(_Strict):
    """`diffuse data report`."""

    attributes: dict[str, list[str]] = Field(
        {}, description="attribute -> values to count in captions, e.g. colour: [red, green]; shows balance")
    clusters: int = Field(8, ge=1, le=100, description="k-means clusters of the caption embeddings")
    top_k: int = Field(20, ge=1, le=1000)
    contact_sheet: int = Field(64, ge=1, le=1024, description="images on the contact sheet")


class CoverageConfig(_Strict):
    """How close a prompt must be to the training captions to count as inside the data's span."""

    # 0.7 with MiniLM: on shapes, "a red circle" scores 0.82 and the held-out "red triangle" 0.84, while an unseen
    # shape ("a purple hexagon") scores 0.60 and "a dog on a beach" 0.21
    threshold: float = Field(0.7, ge=-1, le=1, description="cosine similarity to the nearest training caption")


class ContextConfig(_Strict):
    encoder: Literal["minilm", "clip", "category"] = "minilm"
    clip_path: Path | None = Field(None, description="local directory of a CLIP text model (never downloaded)")
    max_length: int = Field(32, ge=2, le=512, description="tokens kept per caption")
    attach: Literal["cross_attention", "additive", "both"] = Field(
        "both",
        description="cross_attention: tokens via attention; additive: pooled embedding added to the "
        "timestep embedding (every block's feature maps); both",
    )
    standardize: bool = Field(True, description="scale context channels to the training captions' spread")
    whiten: bool = Field(True, description="also give every principal direction of the captions' embeddings the "
                         "same spread, so words the encoder barely tells apart (MiniLM: left / right) weigh as much "
                         "as colour or shape; needs standardize")
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability a sample trains unconditionally")
    image_condition: bool = Field(False, description="also condition on each item's condition image (a doodle), "
                                  "fed as extra UNet input channels; the dataset needs condition images "
                                  "(data.condition_column or ingest.doodles)")
    image_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability a sample trains without its "
                                 "condition image (drawn independently of cfg_dropout): image guidance needs it")
    cache_dir: Path = Field(Path(".cache/embeddings"), description="caption embedding cache")

    @model_validator(mode="after")
    def _check(self):
        if self.whiten and not self.standardize:
            raise ValueError("context.whiten needs context.standardize: true (it whitens the standardized context)")
        if self.encoder == "clip" and self.clip_path is None:
            raise ValueError("encoder 'clip' needs context.clip_path: a local directory with a CLIP text model")
        return self


class ModelConfig(_Strict):
    vae: Path | None = Field(None, description="a latent model: local diffusers AutoencoderKL folder (e.g. the vae/ "
                             "of a Stable Diffusion pipeline, or RUN_DIR/vae of `diffuse train-vae`); the UNet "
                             "denoises its latents. None: a pixel model")
    block_out_channels: list[int] = Field([96, 96, 128], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: list[bool] = Field(
        [False, False, True], description="per resolution level: cross-attention block or plain conv block"
    )
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    patch_size: int = Field(2, ge=1, le=8, description="pixel-unshuffle factor: the UNet runs at res/patch "
                            "(latents: at res/downsampling/patch); default: 2 for a pixel model, 1 with model.vae")
    coord_channels: bool = Field(True, description="add x/y coordinate input channels (helps layout)")
    scale_shift: bool = Field(True, description="ResNet blocks take the (time + pooled context) embedding as "
                              "scale and shift (FiLM) rather than as a bias")

    @model_validator(mode="after")
    def _check(self):
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("model.attention_levels needs one entry per model.block_out_channels entry")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"model.block_out_channels {bad} are not multiples of norm_num_groups "
                             f"({self.norm_num_groups})")
        return self


class DiffusionConfig(_Strict):
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    loss_weighting: Literal["none", "min_snr"] = Field(
        "none", description="none: plain MSE of the prediction target (keeps the high-noise steps that decide "
        "layout at full weight); min_snr: Min-SNR-gamma (Hang et al. 2023)")
    snr_gamma: float = Field(5.0, gt=0, description="min_snr: gamma")


class CycleConfig(_Strict):
    """One learning-rate cycle of train.cycles (pipeline/training/schedule.py)."""

    steps: int = Field(ge=1)
    lr_scale: float = Field(1.0, gt=0, le=1, description="peak lr of the cycle, as a fraction of train.lr")
    warmup_steps: int | None = Field(None, ge=0, description="default: train.warmup_steps")
    batch_size: int | None = Field(None, ge=1, description="default: train.batch_size")
    resolution: int | None = Field(None, ge=4, description="train on the images area-downsampled to this side "
                                   "(at most data.resolution); default: data.resolution")


class LoopConfig(_Strict):
    """What every training loop here has (`train:` of diffuse train, `vae:` of diffuse train-vae): AdamW with a
    warmup + cosine schedule, gradient clipping, EMA weights, the logging and checkpoint cadence, the precision."""

    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(2000, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: bf16 autocast on the CPU too "
        "(weights, optimizer and loss stay fp32; faster on a CPU with AVX512-BF16 or AMX); fp32: no autocast")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")


class TrainConfig(LoopConfig):
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(2000, ge=1, description="with cycles: their total (the default)")
    cycles: list[CycleConfig] = Field(
        [], description="learning-rate cycles, each a warmup + cosine; every cycle after the first is a warm "
        "restart with fresh optimizer moments and EMA, and may train at its own batch size and image side. "
        "Default: one cycle of max_steps")
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode with train.compile; reduce-overhead captures CUDA graphs, which "
        "helps small models whose step is launch-bound")
    gradient_checkpointing: bool = Field(False, description="recompute the UNet's activations in the backward "
                                         "pass: less memory for a larger batch, ~30 % more compute")
    encode_batch_size: int = Field(32, ge=1, description="latent model: images per VAE forward when the latent "
                                   "cache is filled")
    channels_last: bool | None = Field(None, description="channels_last memory format; default: on CUDA only (on "
                                       "the CPU it slows bf16 convolutions and does not speed up fp32 ones)")
    init_from: Path | None = Field(None, description="start from the weights of a model directory (a `diffuse "
                                   "train` output); with context.image_condition a text-only model gets "
                                   "zero-initialised condition channels, so it starts out as it was")

    @model_validator(mode="before")
    @classmethod
    def _max_steps_from_cycles(cls, raw):
        if isinstance(raw, dict) and raw.get("cycles") and raw.get("max_steps") is None:
            cycles = raw["cycles"]
            if isinstance(cycles, list) and all(isinstance(c, dict) and isinstance(c.get("steps"), int)
                                                for c in cycles):
                raw = {**raw, "max_steps": sum(c["steps"] for c in cycles)}
        return raw

    @model_validator(mode="after")
    def _cycles_add_up(self) -> TrainConfig:
        if self.cycles and sum(c.steps for c in self.cycles) != self.max_steps:
            raise ValueError(f"max_steps ({self.max_steps}) is not the total of the cycles' steps "
                             f"({' + '.join(str(c.steps) for c in self.cycles)}); leave max_steps out to use it")
        return self


class VaeConfig(LoopConfig):
    """`diffuse train-vae` (pipeline/training/vae_loop.py): a diffusers AutoencoderKL trained on the dataset's train
    split, for domains where no pretrained VAE fits. Its latents are `2^(levels-1)` times smaller per side."""

    block_out_channels: list[int] = Field([64, 128, 128], min_length=1, description="channels per level; 3 levels "
                                          "= 4x downsampling per side")
    layers_per_block: int = Field(1, ge=1, le=4)
    latent_channels: int = Field(4, ge=1, le=64)
    norm_num_groups: int = Field(32, ge=1)
    mid_block_attention: bool = Field(False, description="self-attention in the middle block (as Stable "
                                      "Diffusion's VAE has); costly at high resolution")
    weight_decay: float = Field(0.0, ge=0)
    reconstruction_loss: Literal["l1", "l2"] = Field("l1", description="l1 keeps edges sharper than l2")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term towards N(0, 1): small, so the "
                             "latents stay informative (Stable Diffusion's VAE: 1e-6)")
    sample_every: int = Field(500, ge=0, description="steps between reconstruction grids (EMA weights, eval "
                              "images); 0 = only at the end")
    eval_items: int = Field(256, ge=1, description="eval-split items for the reconstruction PSNR/SSIM")

    @model_validator(mode="after")
    def _check(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"vae.block_out_channels {bad} are not multiples of vae.norm_num_groups "
                             f"({self.norm_num_groups})")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class TrackingConfig(_Strict):
    """MLflow tracking of `diffuse train` (pipeline/registry/tracking.py)."""

    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else "
                            "sqlite:///mlflow.db in the working directory")
    artifact_location: str | None = Field(None, description="artifact root of a new experiment on a local "
                                          "backend; default: mlartifacts/ beside the sqlite file. A server "
                                          "decides itself.")
    experiment: str = Field("diffuse", min_length=1)
    sample_every: int = Field(250, ge=0, description="steps between sample grids (EMA weights) logged to the "
                              "run; 0 = none")
    sample_prompts: list[str] | None = Field(None, description="prompts of the sample grid; default: 8 spread-out "
                                             "training captions")
    sample_steps: int = Field(20, ge=1, le=1000)
    retries: int = Field(3, ge=0, le=20, description="tries after the first when the tracking server fails")
    backoff_seconds: float = Field(1.0, ge=0, description="wait before retry k: backoff_seconds * 2^k")
    timeout_seconds: float = Field(10.0, gt=0, description="per HTTP request to a tracking server")


class EvaluationConfig(SamplingConfig):
    """The fixed evaluation protocol of `diffuse evaluate` / `diffuse promote` (pipeline/evaluation/protocol.py);
    its images are sampled with the sampler, steps and guidance of SamplingConfig unless set here."""

    data: Path | None = Field(None, description="dataset with the held-out items and the training images for "
                              "the copy rate; default: the model's training data")
    num_items: int = Field(256, ge=1, description="held-out items for the denoising MSE")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="plain imagefolder (no split column): the "
                                 "fixed hashed share of items used as held-out")
    timestep_buckets: int = Field(4, ge=1, le=100, description="denoising MSE per equal range of timesteps")
    prompts: list[str] | None = Field(None, description="fixed prompt set; default: the shapes prompt set when "
                                      "the shapes scorer applies, else held-out captions")
    num_prompts: int = Field(64, ge=1, description="prompts taken from held-out captions (no prompt set)")
    shapes_per_pair: int = Field(4, ge=1, description="shapes prompt set: prompts per colour x shape pair")
    shapes_scorer: Literal["auto", "on", "off"] = Field("auto", description="auto: when the data is shapes data")
    seed: int = Field(0, description="image k of the prompt set uses seed + k")
    copy_threshold: float = Field(0.02, ge=0, description="a generated image is a copy when its RMS pixel "
                                  "distance (0..1 scale, at copy_resolution) to a training image is below this")
    copy_resolution: int = Field(16, ge=4, le=128)
    inception_path: Path | None = Field(None, description="local TorchScript Inception feature extractor "
                                        "(e.g. clean-fid's inception-2015-12-05.pt) for FID/KID; absent: skipped")
    clip_path: Path | None = Field(None, description="local CLIP model directory (transformers) for CLIP "
                                   "score; absent: skipped")


PROMOTION_METRICS = ("denoise_mse", "adherence", "copy_rate", "fid", "kid", "clip_score")


class PromotionConfig(_Strict):
    """The gate of `diffuse promote`: absolute bars, then margins over the current champion."""

    max_denoise_mse: float | None = Field(0.5, description="bar on the mean epsilon-MSE (predicting zero "
                                          "noise scores 1.0); null = no bar")
    min_adherence: float | None = Field(0.5, description="bar on shapes colour+shape adherence (checked when "
                                        "the scorer applies)")
    max_copy_rate: float | None = 0.5
    max_fid: float | None = None
    max_kid: float | None = None
    min_clip_score: float | None = None
    margins: dict[str, float] = Field(
        {"denoise_mse": 0.0, "adherence": 0.0},
        description="the challenger must beat the champion by at least this much on each metric "
        "(0 = not worse); metrics: " + ", ".join(PROMOTION_METRICS),
    )

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.margins) - set(PROMOTION_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics in promotion.margins: {unknown}; known: {list(PROMOTION_METRICS)}")
        return self


class GenerationConfig(SamplingConfig):
    """Batch generation from the prompt store (`diffuse prompts ...`, `diffuse generate`;
    pipeline/generation/batch.py). The sampler/steps/guidance/strength/image_guidance values are the defaults a
    prompt gets when it is added without them, and those of `diffuse sample` and the pyfunc."""

    store_url: str | None = Field(None, description="prompt store, a SQLAlchemy URL (sqlite:///FILE or "
                                  "postgresql://USER@HOST/DB); default: $DIFFUSE_PROMPT_STORE, else "
                                  "sqlite:///prompts.db in the working directory")
    artifact_root: str = Field("outputs", description="where images, manifests and galleries go: a local folder "
                               "or s3://BUCKET/PREFIX (pipeline/storage.py, standard AWS_* environment)")
    batch_size: int = Field(32, ge=1, le=4096, description="images sampled together (compatible prompts only)")
    coverage_policy: Literal["flag", "skip"] = Field(
        "flag", description="prompts outside the training data's span (coverage.threshold): flag = generate and "
        "flag them; skip = do not generate them")
    retries: int = Field(3, ge=0, le=20, description="tries after the first when the artifact store fails")
    backoff_seconds: float = Field(0.5, ge=0, description="wait before retry k: backoff_seconds * 2^k")
    strength: float = Field(0.6, ge=0, le=1, description="img2img: 0 keeps the init image, 1 ignores it")
    image_guidance: float = Field(1.5, ge=0, le=50, description="prompts with a doodle: how strongly the image "
                                  "follows it (1 = plain conditioning, higher = closer to the doodle)")
    num_images: int = Field(1, ge=1, description="images per prompt (seeds seed .. seed+num_images-1)")
    seed: int = Field(0, ge=0)
    max_images_per_prompt: int = Field(64, ge=1)
    max_prompt_chars: int = Field(1000, ge=1, description="longer prompts are refused (also: longer than the "
                                  "model's text encoder takes)")
    experiment: str = Field("generation", min_length=1, description="MLflow experiment of the generation runs")
    thumbnail_px: int = Field(128, ge=16, le=1024, description="gallery thumbnails (embedded in the HTML)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")


class Config(_Strict):
    run_dir: Path = Path("runs/default")
    seed: int = 0
    data: DataConfig
    ingest: IngestConfig = IngestConfig()
    report: ReportConfig = ReportConfig()
    coverage: CoverageConfig = CoverageConfig()
    validation: ValidationConfig = ValidationConfig()
    context: ContextConfig = ContextConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    vae: VaeConfig = VaeConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.model.vae is not None:
            self._check_latent_sides()
        else:
            self._check_pixel_sides()
        if self.context.encoder == "category" and self.data.label_column is None:
            raise ValueError("encoder 'category' needs data.label_column (the class label column)")
        return self

    def _check_pixel_sides(self) -> None:
        levels = len(self.model.block_out_channels)
        step = self.model.patch_size * 2 ** (levels - 1)
        sides = [("data.resolution", self.data.resolution)] + [
            (f"train.cycles[{i}].resolution", c.resolution) for i, c in enumerate(self.train.cycles) if c.resolution]
        for key, res in sides:
            if res % step:
                raise ValueError(f"{key} {res} must be divisible by model.patch_size ({self.model.patch_size}) x "
                                 f"2^(levels-1) ({2 ** (levels - 1)})")
            if res > self.data.resolution:
                raise ValueError(f"{key} ({res}) is above data.resolution ({self.data.resolution}): a cycle trains on "
                                 "the images downsampled, never upsampled")

    def _check_latent_sides(self) -> None:
        """A latent model: the UNet runs on the VAE's latents, unpatched unless model.patch_size says otherwise.
        Whether the sides suit the VAE's downsampling is checked when the VAE is read (the trainer's
        check_image_sizes)."""
        if "patch_size" not in self.model.model_fields_set:
            self.model.patch_size = 1
        lowered = [i for i, c in enumerate(self.train.cycles) if c.resolution not in (None, self.data.resolution)]
        if lowered:
            raise ValueError(f"train.cycles[{lowered[0]}].resolution: a latent model (model.vae) trains at "
                             "data.resolution only (its latents are cached at that side); remove it")


# Keys earlier versions had: what a config file that still sets one should do instead.
RETIRED = {
    ("train", "restart_at"): "use train.cycles: a list of cycles, each {steps, lr_scale, warmup_steps, batch_size, "
                             "resolution} (see configs/shapes.yaml)",
    ("train", "restart_lr_scale"): "use train.cycles[k].lr_scale",
    ("train", "restart_batch_size"): "use train.cycles[k].batch_size",
    ("train", "first_cycle_resolution"): "use train.cycles[0].resolution",
    ("train", "restart_loss_weighting"): "no longer a setting (every cycle trains with diffusion.loss_weighting); "
                                         "remove it",
    ("train", "restart_precision"): "no longer a setting (every cycle trains in train.precision); remove it",
    ("diffusion", "loss_weight_floor"): "no longer a setting (loss weighting is none or min_snr); remove it",
    ("model", "coord_frequencies"): "no longer a setting (coordinates enter as x/y channels); remove it",
}


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = RETIRED.get(tuple(e["loc"][-2:]), "unknown key (check the spelling; see configs/shapes.yaml)")
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data, model, train, ...) at the top")
    return raw


def load_section(path: Path | None, section: str, model: type[BaseModel]):
    """One section of a config file (e.g. `validation` for `diffuse data validate`); defaults without a file."""
    raw = read_yaml(path).get(section) if path is not None else None
    try:
        return model.model_validate(raw or {})
    except ValidationError as e:
        err = format_validation_error(e, str(path))
        raise UserError(err.replace("\n  - ", f"\n  - {section}.")) from None


def _set(raw: dict, dotted: str, value) -> None:
    """raw[a][b][c] = value for "a.b.c"; a number indexes a list (train.cycles.1.steps)."""

    def key(node, part: str):
        if not isinstance(node, list):
            return part
        if not part.isdigit() or int(part) >= len(node):
            raise UserError(f"--set {dotted}: {part!r} is not an index of that list (0..{len(node) - 1})")
        return int(part)

    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[key(node, p)] if isinstance(node, list) else node.setdefault(p, {})
        if not isinstance(node, dict | list):
            raise UserError(f"--set {dotted}: {p} is a value, not a section")
    node[key(node, leaf)] = value


def _validate(raw: dict, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_config(path: Path, overrides: dict | None = None) -> Config:
    """A config file (with --set KEY=VALUE overrides), validated: every mistake is named with its key."""
    raw = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        _set(raw, dotted, value)
    return _validate(raw, str(path))


def load_saved_config(path: Path) -> Config:
    """The config a training run saved (RUN_DIR/config.yaml, MODEL/train_config.yaml). A run written before
    train.cycles had restart_* keys: they are read as the cycles they meant."""
    raw = read_yaml(path)
    train, model, diffusion = (raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("train", "model",
                                                                                          "diffusion"))
    restart = train.pop("restart_at", None)
    scale, batch = train.pop("restart_lr_scale", 0.5), train.pop("restart_batch_size", None)
    side = train.pop("first_cycle_resolution", None)
    for key, neutral in (("restart_loss_weighting", None), ("restart_precision", None)):
        if train.get(key, neutral) == neutral:
            train.pop(key, None)
    if diffusion.get("loss_weight_floor", 0.0) == 0.0:
        diffusion.pop("loss_weight_floor", None)
    if model.get("coord_frequencies", 0) == 0:
        model.pop("coord_frequencies", None)
    if restart is not None and isinstance(train.get("max_steps"), int):
        warmup = train.get("warmup_steps", TrainConfig().warmup_steps)
        train["cycles"] = [{"steps": restart, "resolution": side},
                           {"steps": train["max_steps"] - restart, "lr_scale": scale, "batch_size": batch,
                            "warmup_steps": warmup // 2}]
    return _validate(raw, f"{path} (the configuration the run was trained with)")


class RunnerConfig(_Strict):
    """Where the `retrain` DAG runs its training job (pipeline/orchestration/runners.py): `local` (a subprocess,
    the embedded default), `docker` or `kubernetes`. Read from DIFFUSE_RUNNER_* environment variables (lists
    comma-separated), so the DAG file chooses its operator at parse time without touching Airflow's database."""

    kind: Literal["local", "docker", "kubernetes"] = "local"
    image: str = Field("diffuse-pipeline:latest", description="image built from docker/pipeline.Dockerfile")
    gpus: int = Field(1, ge=0, description="GPUs per training job (0: CPU)")
    workspace: str = Field("/workspace", description="where the job sees the shared workspace (data, runs)")
    volume: str | None = Field(None, description="docker: host folder mounted at `workspace`; kubernetes: a "
                                                  "PersistentVolumeClaim name")
    namespace: str = "diffuse"
    pod_template: Path = Field(Path("infra/k8s/gpu-pod-template.yaml"), description="relative: to the project "
                               "folder")
    docker_url: str = "unix://var/run/docker.sock"
    network: str | None = Field(None, description="docker: the network the training container joins (e.g. the "
                                "compose stack's `diffuse`), so it reaches MLflow by service name")
    timeout_hours: float = Field(12, gt=0, description="a training job running longer is stopped")
    pass_env: list[str] = Field(["MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                 "MLFLOW_S3_ENDPOINT_URL"], description="environment passed into the job")


class DagConfig(_Strict):
    """What the DAGs in dags/ work on, from DIFFUSE_* environment variables (read when a DAG file is parsed)."""

    workspace: Path | None = Field(None, description="the folder the pipelines read and write (data/, runs/, the "
                                   "DVC project, the default MLflow and prompt stores); default: the project folder")
    config: str = Field("configs/shapes.yaml", description="the config file every step reads; relative: to the "
                        "project folder")
    model_name: str = Field("shapes", min_length=1, description="registered model name")
    dataset_name: str = Field("shapes", min_length=1, description="prepared dataset name (data/prepared/NAME)")
    source: str = Field("data/shapes", min_length=1, description="what dataset_update ingests by default")
    generate_shards: int = Field(2, ge=1, description="parallel generate tasks of batch_generate")
    train_vae: bool = Field(False, description="retrain first trains a VAE (`diffuse train-vae`, the config's vae: "
                            "section) and then the latent model on it (model.vae = that VAE)")


def from_environment(model: type[BaseModel], prefix: str, env: dict[str, str] | None = None,
                     exclusive: bool = False):
    """Settings from PREFIX + FIELD (upper case) environment variables, validated like a config file section.
    `exclusive`: every variable under PREFIX must be one of the fields (a misspelt one is an error)."""
    env = os.environ if env is None else env
    fields = model.model_fields
    raw: dict = {}
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].lower()
        if name not in fields and not exclusive:
            continue
        is_list = name in fields and get_origin(fields[name].annotation) is list
        raw[name] = [v for v in value.split(",") if v] if is_list else value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = [f"environment ({prefix}* variables): invalid settings"]
        for problem in e.errors():
            name = prefix + "_".join(str(p) for p in problem["loc"][:1]).upper()
            msg = "unknown variable (check the spelling)" if problem["type"] == "extra_forbidden" else \
                problem["msg"].removeprefix("Value error, ")
            lines.append(f"  - {name}: {msg}")
        raise UserError("\n".join(lines)) from None
