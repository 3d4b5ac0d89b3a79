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
    path: Path = Field(description="imagefolder with metadata.jsonl (file_name + caption column)")
    caption_column: str = "text"
    label_column: str | None = Field(None, description="class label column, for encoder: category")
    resolution: int = Field(32, ge=8, le=1024)


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
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability a sample trains unconditionally")
    cache_dir: Path = Field(Path(".cache/embeddings"), description="caption embedding cache")

    @model_validator(mode="after")
    def _check(self):
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

    @model_validator(mode="after")
    def _check(self):
        if self.loss_weighting == "clamped_snr" and self.prediction_type != "v_prediction":
            raise ValueError("loss_weighting 'clamped_snr' needs prediction_type 'v_prediction' (with epsilon "
                             "its weight grows without bound at high noise); use 'min_snr' or 'none'")
        return self


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
    channels_last: bool = True
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")


class Config(_Strict):
    run_dir: Path = Path("runs/default")
    seed: int = 0
    data: DataConfig
    context: ContextConfig = ContextConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self):
        levels = len(self.model.block_out_channels)
        unet_res = self.data.resolution // self.model.patch_size
        if self.data.resolution % self.model.patch_size or unet_res % (2 ** (levels - 1)):
            raise ValueError(
                f"data.resolution {self.data.resolution} must be divisible by model.patch_size "
                f"({self.model.patch_size}) x 2^(levels-1) ({2 ** (levels - 1)})"
            )
        if self.context.encoder == "category" and self.data.label_column is None:
            raise ValueError("encoder 'category' needs data.label_column (the class label column)")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check the spelling; see configs/shapes.yaml)" if e["type"] == "extra_forbidden" \
            else e["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def load_config(path: Path, overrides: dict | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data, model, train, ...) at the top")
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
