"""The fixed evaluation protocol behind `diffuse evaluate` and the promotion gate.

    evaluate(model_dir, ec) -> report (JSON-ready dict)

1. Denoising MSE per timestep bucket on held-out items: the prepared dataset's `split == "eval"` rows (a raw
   imagefolder is read through the trainer's ingest cache, so its split is the training's); data without an eval
   split falls back to a fixed hashed subset, and the report says it was trained on. Fixed timesteps and noise
   per item (seeded), reported as epsilon-MSE so epsilon- and v-prediction models compare (predicting zero
   noise scores 1.0).
2. A fixed prompt set with fixed seeds, sampler, steps and guidance is generated once; on it:
   - prompt adherence with the analytic shapes scorer, where it applies (shapes data);
   - copy rate: share of generated images whose nearest training image (RMS pixel distance at a small
     resolution, 0..1 scale) is closer than `copy_threshold` -- memorisation shows up here;
   - FID/KID (held-out images vs generated) with a local Inception TorchScript file, CLIP score with a local
     CLIP model. Without the weights they are recorded under "skipped" with the reason, never estimated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import Config, DataConfig, EvaluationConfig, IngestConfig
from pipeline.data.loader import open_training_data
from pipeline.data.prepared import is_prepared, open_prepared
from pipeline.errors import UserError
from pipeline.evaluation.metrics import clip_score, copy_rate, denoising_mse, fid_and_kid
from pipeline.images import channels_first, grid, to_pil
from pipeline.model.folder import load_model, read_train_config
from pipeline.model.network import ModelSpec
from pipeline.model.sampling import generate
from pipeline.shapes import dataset as shapes
from pipeline.shapes import scorer

log = logging.getLogger(__name__)
WEIGHTS_MISSING = "skipped: weights not available"
# which way is better, for the promotion gate
HIGHER_IS_BETTER = {"adherence": True, "clip_score": True, "denoise_mse": False, "copy_rate": False,
                    "fid": False, "kid": False}


@dataclass
class EvalData:
    path: Path
    version: str | None
    heldout_images: np.ndarray  # (n, R, R, 3) uint8 at the model's resolution (bucketed: centre squares)
    heldout_captions: list[str]
    dataset: object  # PreparedDataset: training images for the copy rate are read from it in chunks
    train_rows: np.ndarray
    resolution: int
    is_shapes: bool
    heldout_rule: str


def _looks_like_shapes(path: Path, captions: list[str]) -> bool:
    info = path / "dataset_info.json"
    if info.is_file():
        try:
            if json.loads(info.read_text()).get("kind") == "shapes":
                return True
        except json.JSONDecodeError:
            pass
    if not captions:
        return False
    parsed = [shapes.parse_prompt(c) for c in captions[:200]]
    return sum({"colour", "shape", "position"} <= p.keys() for p in parsed) >= 0.9 * len(parsed)


def _prepared(path: Path, resolution: int, train_cfg: Config | None):
    """A prepared dataset as is; a raw imagefolder through the trainer's own ingest cache (same settings as the
    model's training, hence the same split)."""
    if is_prepared(path):
        return open_prepared(path)
    data = train_cfg.data if train_cfg else DataConfig(path=path)
    data = data.model_copy(update={"path": Path(path), "resolution": resolution})
    return open_training_data(data, train_cfg.ingest if train_cfg else IngestConfig()).dataset


def load_eval_data(path: Path, resolution: int, ec: EvaluationConfig, train_cfg: Config | None = None) -> EvalData:
    path = Path(path)
    ds = _prepared(path, resolution, train_cfg)
    m = ds.manifest.reset_index(drop=True)
    split = m["split"] if "split" in m.columns else None
    if split is not None and (split == "eval").any():
        heldout = m[split == "eval"].sort_values("id").head(ec.num_items)
        train_rows = np.flatnonzero((split == "train").to_numpy())
        rule = "manifest split == 'eval'"
    else:  # nothing held out at ingest: a fixed hashed subset, which the model has also trained on -- said so
        order = m.assign(_key=[hashlib.sha256(str(i).encode()).hexdigest() for i in m["id"]]).sort_values("_key")
        heldout = order.head(min(ec.num_items, max(1, round(ec.eval_fraction * len(m)))))
        train_rows = np.arange(len(m))
        rule = (f"no eval split in the data: {len(heldout)} items chosen by id hash (also trained on, so the "
                "denoising MSE is not a held-out measure)")
    captions = heldout["caption"].tolist()
    return EvalData(path, ds.version, ds.square_images(heldout.index.to_numpy(), resolution), captions, ds,
                    train_rows, resolution, _looks_like_shapes(path, captions), rule)


# ------------------------------------------------------------------ metrics


# ------------------------------------------------------------------ the protocol


def protocol(ec: EvaluationConfig, data: EvalData) -> dict:
    return {**ec.model_dump(mode="json", exclude={"data"}), "data": str(data.path), "data_version": data.version,
            "heldout_items": len(data.heldout_captions), "heldout_rule": data.heldout_rule,
            "reference_images": len(data.train_rows)}


def prompt_set(ec: EvaluationConfig, data: EvalData, use_shapes: bool) -> list[str]:
    if ec.prompts:
        return list(ec.prompts)
    if use_shapes:
        return [p for _, p in shapes.eval_prompts(ec.shapes_per_pair)]
    return data.heldout_captions[: ec.num_prompts]


def evaluate(model_dir: Path, ec: EvaluationConfig, data: EvalData | None = None) -> dict:
    """Run the protocol on a model directory; `data` may be passed in to share it between models."""
    start = time.perf_counter()
    model = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    if data is None:
        data = load_eval_data_for(model_dir, ec)
    use_shapes = ec.shapes_scorer == "on" or (ec.shapes_scorer == "auto" and data.is_shapes)
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    details: dict = {}

    metrics |= denoising_mse(model, data.heldout_images, data.heldout_captions, ec.timestep_buckets, ec.seed)
    prompts = prompt_set(ec, data, use_shapes)
    seeds = [ec.seed + k for k in range(len(prompts))]
    images = generate(model, prompts, seeds, sampler=ec.sampler, steps=ec.steps, guidance=ec.guidance)
    details["sample_grid"] = grid(images[:16], cols=8)  # kept in memory; written by the caller

    if use_shapes:
        summary = scorer.score(zip(map(to_pil, images), prompts, strict=True))["summary"]
        details["shapes_summary"] = summary
        metrics["adherence"] = summary["all"].get("colour+shape", 0.0)
        for attr in (*scorer.ATTRIBUTES, "all"):
            if attr in summary["all"]:
                metrics[f"adherence_{attr}"] = summary["all"][attr]
        for group in ("seen", "held_out"):
            if summary.get(group, {}).get("n"):
                metrics[f"adherence_{group}"] = summary[group].get("colour+shape", 0.0)
    else:
        skipped["adherence"] = "skipped: no prompt-adherence scorer for this data (shapes only)"

    metrics |= copy_rate(images, data.dataset, data.train_rows, data.resolution, ec.copy_resolution,
                         ec.copy_threshold)

    if ec.inception_path is None or not Path(ec.inception_path).is_file():
        why = "evaluation.inception_path not set" if ec.inception_path is None else f"{ec.inception_path} not found"
        skipped["fid"] = skipped["kid"] = f"{WEIGHTS_MISSING} ({why})"
    else:
        real = channels_first(data.heldout_images)
        if len(real) < 2 or len(images) < 2:
            skipped["fid"] = skipped["kid"] = "skipped: FID/KID need at least 2 held-out and 2 generated images"
        else:
            metrics |= fid_and_kid(Path(ec.inception_path), real, images, ec.seed)
    if ec.clip_path is None or not Path(ec.clip_path).is_dir():
        why = "evaluation.clip_path not set" if ec.clip_path is None else f"{ec.clip_path} not found"
        skipped["clip_score"] = f"{WEIGHTS_MISSING} ({why})"
    else:
        metrics["clip_score"] = clip_score(Path(ec.clip_path), images, prompts)

    proto = protocol(ec, data)
    train_cfg = read_train_config(model_dir)
    return {
        "model_dir": str(model_dir),
        "protocol": proto,
        "protocol_id": hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:12],
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "skipped": skipped,
        "details": details,
        "train_config": train_cfg.model_dump(mode="json") if train_cfg else None,
        "vae": model.spec.vae.model_dump(mode="json") if model.spec.vae else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def model_data_settings(model_dir: Path) -> tuple[Path | None, int, Config | None]:
    """(training data path, resolution, training config) of a model directory."""
    spec = ModelSpec.model_validate_json((Path(model_dir) / "conditioning.json").read_text())
    train_cfg = read_train_config(model_dir)
    return (train_cfg.data.path if train_cfg else None), spec.resolution, train_cfg


def load_eval_data_for(model_dir: Path, ec: EvaluationConfig) -> EvalData:
    """The protocol's data for a model: evaluation.data, else the data the model was trained on."""
    train_path, resolution, train_cfg = model_data_settings(model_dir)
    path = ec.data or train_path
    if path is None or not Path(path).exists():
        where = "evaluation.data" if ec.data else f"the model's training data ({model_dir}/train_config.yaml)"
        raise UserError(f"evaluation data not found: {path} ({where}); set evaluation.data in the config given "
                        "with --config to a prepared dataset or imagefolder")
    return load_eval_data(Path(path), resolution, ec, train_cfg)


def public_report(report: dict) -> dict:
    """The report without in-memory objects (the sample grid image)."""
    return {**report, "details": {k: v for k, v in report["details"].items() if k != "sample_grid"}}


def save_report(report: dict, path: Path) -> Path:
    """The report as JSON, and its sample grid as PATH.png beside it (load_report reads both back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(public_report(report), indent=2, default=str))
    if report["details"].get("sample_grid") is not None:
        report["details"]["sample_grid"].save(path.with_suffix(".png"))
    return path


def load_report(path: Path) -> dict:
    path = Path(path)
    report = json.loads(path.read_text())
    if path.with_suffix(".png").is_file():
        with Image.open(path.with_suffix(".png")) as im:
            report["details"]["sample_grid"] = im.convert("RGB")
    return report
