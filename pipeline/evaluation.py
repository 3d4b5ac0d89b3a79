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
import torch.nn.functional as F

from pipeline.config import EvaluationConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)
WEIGHTS_MISSING = "skipped: weights not available"
# which way is better, for the promotion gate
HIGHER_IS_BETTER = {"adherence": True, "clip_score": True, "denoise_mse": False, "copy_rate": False,
                    "fid": False, "kid": False}


@dataclass
class EvalData:
    path: Path
    version: str | None
    heldout_images: np.ndarray  # (n, R, R, 3) uint8 at the model's resolution
    heldout_captions: list[str]
    dataset: object  # PreparedDataset: training images for the copy rate are read from it in chunks
    train_rows: np.ndarray
    resolution: int
    is_shapes: bool
    heldout_rule: str


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    if images.shape[1] == resolution:
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="area" if images.shape[1] > resolution else "bilinear")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _looks_like_shapes(path: Path, captions: list[str]) -> bool:
    from pipeline import shapes

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


def _prepared(path: Path, resolution: int, train_cfg: dict | None):
    """A prepared dataset as is; a raw imagefolder through the trainer's own ingest cache (same settings as the
    model's training, hence the same split)."""
    from pipeline.config import DataConfig, IngestConfig
    from pipeline.dataset import open_training_data
    from pipeline.prepared import is_prepared, open_prepared

    if is_prepared(path):
        return open_prepared(path)
    train_cfg = train_cfg or {}
    data = {**(train_cfg.get("data") or {}), "path": str(path), "resolution": resolution}
    try:
        dc, ic = DataConfig.model_validate(data), IngestConfig.model_validate(train_cfg.get("ingest") or {})
    except Exception as e:
        raise UserError(f"cannot read {path} with the model's data settings ({e})") from None
    return open_training_data(dc, ic).dataset


def load_eval_data(path: Path, resolution: int, ec: EvaluationConfig, train_cfg: dict | None = None) -> EvalData:
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
    return EvalData(path, ds.version, _resize(ds.images(heldout.index.to_numpy()), resolution), captions, ds,
                    train_rows, resolution, _looks_like_shapes(path, captions), rule)


# ------------------------------------------------------------------ metrics


@torch.no_grad()
def denoising_mse(model, images: np.ndarray, captions: list[str], buckets: int, seed: int,
                  batch_size: int = 64) -> dict[str, float]:
    """Epsilon-MSE per equal timestep range, each item at one seeded timestep and noise draw per range."""
    from diffusers import DDPMScheduler

    from pipeline.network import denoise
    from pipeline.sample import encode_prompts

    sched = DDPMScheduler.from_config(model.scheduler_config)
    total = sched.config.num_train_timesteps
    device = next(model.unet.parameters()).device
    x0_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    ctx_all = encode_prompts(model.spec, captions)
    out = {}
    for b in range(buckets):
        lo, hi = b * total // buckets, max((b + 1) * total // buckets, b * total // buckets + 1)
        g = torch.Generator().manual_seed(seed * 1000 + b)
        t_all = torch.randint(lo, hi, (len(captions),), generator=g)
        noise_all = torch.randn(x0_all.shape, generator=g)
        errs = []
        for i in range(0, len(captions), batch_size):
            sl = slice(i, i + batch_size)
            x0, noise, t = x0_all[sl].to(device), noise_all[sl].to(device), t_all[sl].to(device)
            x_t = sched.add_noise(x0, noise, t)
            ctx = ctx_all.index(torch.arange(i, min(i + batch_size, len(captions))))
            ctx = type(ctx)(*[None if a is None else a.to(device) for a in ctx.astuple()])
            pred = denoise(model.unet, model.spec, x_t, t, ctx).float()
            if sched.config.prediction_type == "v_prediction":  # eps = sqrt(ab) * v + sqrt(1 - ab) * x_t
                ab = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
                pred = ab.sqrt() * pred + (1 - ab).sqrt() * x_t
            errs.append(((pred - noise) ** 2).mean(dim=(1, 2, 3)).cpu())
        out[f"denoise_mse_t{lo:04d}_{hi:04d}"] = float(torch.cat(errs).mean())
    out["denoise_mse"] = float(np.mean(list(out.values())))
    return out


def copy_rate(generated: torch.Tensor, data: EvalData, resolution: int, threshold: float,
              chunk: int = 4096) -> dict[str, float]:
    """Share of generated images (N, 3, R, R uint8) whose nearest training image, compared as RMS pixel distance
    on a 0..1 scale at `resolution`, is closer than `threshold`. Training images are read in chunks."""

    def small(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="area")
        return x.flatten(1)

    gen = small(generated)
    best = torch.full((len(gen),), float("inf"))
    for i in range(0, len(data.train_rows), chunk):
        pixels = _resize(data.dataset.images(data.train_rows[i:i + chunk]), data.resolution)
        ref = small(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        best = torch.minimum(best, torch.cdist(gen, ref).min(dim=1).values)
    rms = best / gen.shape[1] ** 0.5
    return {"copy_rate": float((rms < threshold).float().mean()), "nearest_train_distance_mean": float(rms.mean()),
            "nearest_train_distance_min": float(rms.min())}


def _inception_features(path: Path, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Features from a TorchScript Inception (clean-fid / StyleGAN3 `inception-2015-12-05.pt` convention: float
    images in 0..255 at 299x299, called with return_features=True)."""
    net = torch.jit.load(str(path), map_location="cpu").eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = F.interpolate(images[i:i + batch_size].float(), size=(299, 299), mode="bilinear",
                              align_corners=False)
            try:
                f = net(x, return_features=True)
            except (RuntimeError, TypeError):  # a plain feature extractor without the flag
                f = net(x)
            feats.append(f.reshape(len(x), -1).double().numpy())
    return np.concatenate(feats)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (Heusel et al. 2017): |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 sqrt(Sa Sb))."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(sa @ sb, disp=False)
    if not np.isfinite(covmean).all():  # singular product (few samples): the usual small diagonal offset
        off = np.eye(len(sa)) * 1e-6
        covmean = linalg.sqrtm((sa + off) @ (sb + off))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean.real))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def clip_score(path: Path, images: torch.Tensor, prompts: list[str]) -> float:
    """100 x cosine(image, text) clipped at 0, averaged (the usual CLIP score), with a local CLIP model."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    scores = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[i:i + 32]]
            batch = proc(text=prompts[i:i + 32], images=pil, return_tensors="pt", padding=True, truncation=True)
            out = model(**batch)
            img = F.normalize(out.image_embeds, dim=-1)
            txt = F.normalize(out.text_embeds, dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0))
    return float(torch.cat(scores).mean())


# ------------------------------------------------------------------ the protocol


def protocol(ec: EvaluationConfig, data: EvalData) -> dict:
    return {**ec.model_dump(mode="json", exclude={"data"}), "data": str(data.path), "data_version": data.version,
            "heldout_items": len(data.heldout_captions), "heldout_rule": data.heldout_rule,
            "reference_images": len(data.train_rows)}


def prompt_set(ec: EvaluationConfig, data: EvalData, use_shapes: bool) -> list[str]:
    from pipeline import shapes

    if ec.prompts:
        return list(ec.prompts)
    if use_shapes:
        return [p for _, p in shapes.eval_prompts(ec.shapes_per_pair)]
    return data.heldout_captions[: ec.num_prompts]


def evaluate(model_dir: Path, ec: EvaluationConfig, data: EvalData | None = None) -> dict:
    """Run the protocol on a model directory; `data` may be passed in to share it between models."""
    import yaml

    from pipeline import shapes
    from pipeline.model_dir import load_model
    from pipeline.sample import generate, grid

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
        from PIL import Image

        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        summary = shapes.score(zip(pil, prompts, strict=True))["summary"]
        details["shapes_summary"] = summary
        metrics["adherence"] = summary["all"].get("colour+shape", 0.0)
        for attr in (*shapes.ATTRIBUTES, "all"):
            if attr in summary["all"]:
                metrics[f"adherence_{attr}"] = summary["all"][attr]
        for group in ("seen", "held_out"):
            if summary.get(group, {}).get("n"):
                metrics[f"adherence_{group}"] = summary[group].get("colour+shape", 0.0)
    else:
        skipped["adherence"] = "skipped: no prompt-adherence scorer for this data (shapes only)"

    metrics |= copy_rate(images, data, ec.copy_resolution, ec.copy_threshold)

    if ec.inception_path is None or not Path(ec.inception_path).is_file():
        why = "evaluation.inception_path not set" if ec.inception_path is None else f"{ec.inception_path} not found"
        skipped["fid"] = skipped["kid"] = f"{WEIGHTS_MISSING} ({why})"
    else:
        real = torch.from_numpy(np.ascontiguousarray(data.heldout_images)).permute(0, 3, 1, 2)
        if len(real) < 2 or len(images) < 2:
            skipped["fid"] = skipped["kid"] = "skipped: FID/KID need at least 2 held-out and 2 generated images"
        else:
            fr, fg = _inception_features(Path(ec.inception_path), real), _inception_features(
                Path(ec.inception_path), images)
            metrics["fid"] = frechet_distance(fr, fg)
            metrics["kid"] = kernel_inception_distance(fr, fg)
    if ec.clip_path is None or not Path(ec.clip_path).is_dir():
        why = "evaluation.clip_path not set" if ec.clip_path is None else f"{ec.clip_path} not found"
        skipped["clip_score"] = f"{WEIGHTS_MISSING} ({why})"
    else:
        metrics["clip_score"] = clip_score(Path(ec.clip_path), images, prompts)

    proto = protocol(ec, data)
    train_cfg = model_dir / "train_config.yaml"
    return {
        "model_dir": str(model_dir),
        "protocol": proto,
        "protocol_id": hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:12],
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "skipped": skipped,
        "details": details,
        "train_config": yaml.safe_load(train_cfg.read_text()) if train_cfg.is_file() else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def model_data_settings(model_dir: Path) -> tuple[Path | None, int, dict]:
    """(training data path, resolution, training config) of a model directory."""
    import yaml

    from pipeline.network import ModelSpec

    spec = ModelSpec.model_validate_json((Path(model_dir) / "conditioning.json").read_text())
    cfg_file = Path(model_dir) / "train_config.yaml"
    train_cfg = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
    path = (train_cfg.get("data") or {}).get("path")
    return (Path(path) if path else None), spec.resolution, train_cfg


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
    from PIL import Image

    path = Path(path)
    report = json.loads(path.read_text())
    if path.with_suffix(".png").is_file():
        with Image.open(path.with_suffix(".png")) as im:
            report["details"]["sample_grid"] = im.convert("RGB")
    return report
