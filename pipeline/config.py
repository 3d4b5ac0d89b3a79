"""The one configuration system: YAML files validated by pydantic, with errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
    doodles: bool = Field(False, description="derive a doodle (pipeline/doodle.py) for every item without a "
                          "condition image, so any image-text set can train a sketch model")


# `diffuse data validate` checks and whether a failure stops the pipeline by default (hard: exit 1) or warns (soft)
VALIDATION_CHECKS = {
    "ids_present": "hard", "ids_unique": "hard", "captions_present": "hard", "captions_not_blank": "hard",
    "caption_length": "hard", "image_caption_pairs_unique": "hard", "split_values": "hard",
    "shard_rows_unique": "hard", "item_count": "hard", "shards_match_manifest": "hard", "resolution": "hard",
    "image_shape": "hard", "quarantine_rate": "hard", "exact_duplicate_rate": "soft",
    "near_duplicate_rate": "soft", "near_constant_share": "soft", "caption_vocabulary": "soft",
}


class ValidationConfig(_Strict):
    """The data gate of `diffuse data validate` (pipeline/validate.py): thresholds and hard/soft per check."""

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
        "cross_attention",
        description="cross_attention: tokens via attention; additive: pooled embedding added to the "
        "timestep embedding (every block's feature maps); both",
    )
    standardize: bool = Field(True, description="scale context channels to the training captions' spread")
    whiten: bool = Field(False, description="also give every principal direction of the captions' embeddings the "
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
    block_out_channels: list[int] = Field([64, 128, 128], min_length=1)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: list[bool] = Field(
        [False, True, True], description="per resolution level: cross-attention block or plain conv block"
    )
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    patch_size: int = Field(2, ge=1, le=8, description="pixel-unshuffle factor: the UNet runs at res/patch")
    coord_channels: bool = Field(True, description="add x/y coordinate input channels (helps layout)")
    coord_frequencies: int = Field(0, ge=0, le=8, description="also sin/cos coordinate features at 1..N octaves")
    scale_shift: bool = Field(False, description="ResNet blocks take the (time + pooled context) embedding as "
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
    loss_weighting: Literal["none", "min_snr", "clamped_snr"] = Field(
        "clamped_snr",
        description="none: plain MSE; min_snr: Min-SNR-gamma; clamped_snr: x0-weight clamp(SNR, 1, gamma), "
        "Min-SNR's cap on easy low-noise steps without starving the high-noise steps that decide layout",
    )
    snr_gamma: float = Field(5.0, gt=0)
    loss_weight_floor: float = Field(
        0.0, ge=0, le=1, description="min_snr / clamped_snr: no step weighs less than this share of its plain-MSE "
        "weight (0: as published; 1: plain MSE). Min-SNR with a floor emphasizes mid noise without starving the "
        "high-noise steps that hold the layout")

    @model_validator(mode="after")
    def _check(self):
        check_loss_weighting("loss_weighting", self.loss_weighting, self.prediction_type)
        return self


def check_loss_weighting(key: str, weighting: str | None, prediction_type: str) -> None:
    """clamped_snr is defined for v-prediction only (the config key `key` names the offending setting)."""
    if weighting == "clamped_snr" and prediction_type != "v_prediction":
        raise ValueError(f"{key} 'clamped_snr' needs prediction_type 'v_prediction' (with epsilon its weight grows "
                         "without bound at high noise); use 'min_snr' or 'none'")


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(2000, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    compile: bool = False
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: bf16 autocast on the CPU too "
        "(weights, optimizer and loss stay fp32; 1.3-1.4x the img/s on an AVX-512-BF16 CPU, BENCHMARKS.md); fp32: "
        "no autocast")
    channels_last: bool | None = Field(None, description="channels_last memory format; default: on CUDA only (on "
                                       "the CPU it made bf16 convolutions slower and fp32 ones no faster)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    init_from: Path | None = Field(None, description="start from the weights of a model directory (a `diffuse "
                                   "train` output); with context.image_condition a text-only model gets "
                                   "zero-initialised condition channels, so it starts out as it was")
    restart_at: int | None = Field(None, ge=1, description="warm restart at this step: a second warmup (half of "
                                   "warmup_steps) + cosine cycle to max_steps at lr * restart_lr_scale, with "
                                   "fresh optimizer moments and a fresh EMA of the current weights (fine-tuning "
                                   "the finished first cycle, in one run)")
    restart_lr_scale: float = Field(0.5, gt=0, le=1, description="peak lr of the second cycle, as a fraction of lr")
    restart_batch_size: int | None = Field(None, ge=1, description="batch size of the second cycle (default: "
                                           "batch_size); smaller: more, noisier updates for the same images")
    restart_loss_weighting: Literal["none", "min_snr", "clamped_snr"] | None = Field(
        None, description="diffusion.loss_weighting of the second cycle (default: the same)")
    restart_precision: Literal["auto", "bf16", "fp32"] | None = Field(
        None, description="precision of the second cycle (default: the same); e.g. bf16 for the first cycle's speed "
        "and fp32 for the second, where shape is learnt (BENCHMARKS.md, session 9)")
    first_cycle_resolution: int | None = Field(
        None, ge=4, description="train the first cycle on the images downsampled (area average) to this side, e.g. 16 "
        "for 32-px data: 2.3x the img/s of 32 px on a 2-core CPU; the UNet is convolutional, so its weights go on at "
        "data.resolution in the second cycle (needs restart_at)")

    @model_validator(mode="after")
    def _restart_inside_run(self) -> TrainConfig:
        if self.restart_at is not None and self.restart_at >= self.max_steps:
            raise ValueError(f"restart_at ({self.restart_at}) must be below max_steps ({self.max_steps})")
        for key in ("restart_batch_size", "restart_loss_weighting", "restart_precision"):
            if getattr(self, key) is not None and self.restart_at is None:
                raise ValueError(f"{key} applies to the second cycle: set restart_at too")
        if self.first_cycle_resolution is not None and self.restart_at is None:
            raise ValueError("first_cycle_resolution applies to the first cycle: set restart_at, where it ends")
        return self

    def in_second_cycle(self, step: int) -> bool:
        return self.restart_at is not None and step >= self.restart_at

    def at(self, step: int, value, restart_value):
        """`restart_value` (a restart_* setting) in the second cycle where it is set, else `value`."""
        return restart_value if self.in_second_cycle(step) and restart_value is not None else value

    def batch_size_at(self, step: int) -> int:
        """The (global, per micro-batch) batch size of step `step` (0-based)."""
        return self.at(step, self.batch_size, self.restart_batch_size)

    def resolution_at(self, step: int, data_resolution: int) -> int:
        """The image side step `step` trains at: first_cycle_resolution before the restart, where it is set."""
        return self.at(step, self.first_cycle_resolution or data_resolution, data_resolution)

    def resolution_after(self, steps_done: int, data_resolution: int) -> int:
        """The side the weights after `steps_done` steps last trained at: a checkpoint's or a sample grid's."""
        return self.resolution_at(steps_done - 1, data_resolution)

    def samples_before(self, step: int) -> int:
        """Position in the training stream where step `step` starts: the samples of all steps before it."""
        first = min(step, self.restart_at or step)
        return (first * self.batch_size + (step - first) * self.batch_size_at(step)) * self.grad_accum


class TrackingConfig(_Strict):
    """MLflow tracking of `diffuse train` (pipeline/mlflow_tracking.py)."""

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


class EvaluationConfig(_Strict):
    """The fixed evaluation protocol of `diffuse evaluate` / `diffuse promote` (pipeline/evaluation.py)."""

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
    sampler: Literal["dpmpp", "ddim", "ddpm"] = "dpmpp"
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(4.0, ge=0, le=50)
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


class GenerationConfig(_Strict):
    """Batch generation from the prompt store (`diffuse prompts ...`, `diffuse generate`; pipeline/generation.py).
    The sampler/steps/guidance/... values are the defaults a prompt gets when it is added without them."""

    store_url: str | None = Field(None, description="prompt store, a SQLAlchemy URL (sqlite:///FILE or "
                                  "postgresql://USER@HOST/DB); default: $DIFFUSE_PROMPT_STORE, else "
                                  "sqlite:///prompts.db in the working directory")
    artifact_root: str = Field("outputs", description="where images, manifests and galleries go: a local folder "
                               "or s3://BUCKET/PREFIX (boto3, standard AWS_* environment)")
    batch_size: int = Field(32, ge=1, le=4096, description="images sampled together (compatible prompts only)")
    coverage_policy: Literal["flag", "skip"] = Field(
        "flag", description="prompts outside the training data's span (coverage.threshold): flag = generate and "
        "flag them; skip = do not generate them")
    retries: int = Field(3, ge=0, le=20, description="tries after the first when the artifact store fails")
    backoff_seconds: float = Field(0.5, ge=0, description="wait before retry k: backoff_seconds * 2^k")
    sampler: Literal["dpmpp", "ddim", "ddpm"] = "dpmpp"
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(4.0, ge=0, le=50)
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
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _check(self):
        levels = len(self.model.block_out_channels)
        for key, res in (("data.resolution", self.data.resolution),
                         ("train.first_cycle_resolution", self.train.first_cycle_resolution)):
            if res is not None and res % (self.model.patch_size * 2 ** (levels - 1)):
                raise ValueError(f"{key} {res} must be divisible by model.patch_size ({self.model.patch_size}) x "
                                 f"2^(levels-1) ({2 ** (levels - 1)})")
        if (self.train.first_cycle_resolution or 0) >= self.data.resolution:
            raise ValueError(f"train.first_cycle_resolution ({self.train.first_cycle_resolution}) must be below "
                             f"data.resolution ({self.data.resolution}): it is the cheaper first cycle's image side")
        if self.context.encoder == "category" and self.data.label_column is None:
            raise ValueError("encoder 'category' needs data.label_column (the class label column)")
        check_loss_weighting("train.restart_loss_weighting", self.train.restart_loss_weighting,
                             self.diffusion.prediction_type)
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check the spelling; see configs/shapes.yaml)" if e["type"] == "extra_forbidden" \
            else e["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict:
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
    raw = _read_yaml(path).get(section) if path is not None else None
    try:
        return model.model_validate(raw or {})
    except ValidationError as e:
        err = format_validation_error(e, str(path))
        raise UserError(err.replace("\n  - ", f"\n  - {section}.")) from None


def load_config(path: Path, overrides: dict | None = None) -> Config:
    raw = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None
