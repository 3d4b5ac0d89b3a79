"""MLflow tracking for `diffuse train`: an MLflowLogger behind the MetricsLogger interface
(pipeline/training/loggers.py), and `log_only` for a finished local run whose tracking failed or was off.

The run id is kept in RUN_DIR/mlflow_run.json, so `--resume` (and `--log-only`) continue the same MLflow run.
Every call to the tracking store goes through `with_retries` (pipeline/registry/client.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from PIL import Image

from pipeline.config import Config, TrackingConfig, load_saved_config
from pipeline.data.prepared import is_prepared, open_prepared
from pipeline.errors import UserError
from pipeline.registry.client import (
    TrackingUnavailable,
    connect,
    read_run_file,
    short,
    tracking_uri,
    with_retries,
    write_run_file,
)
from pipeline.registry.pyfunc import log_pyfunc

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ what a run records


def git_info() -> dict[str, str]:
    """Commit of the code that runs (the pipeline package's repository), and whether it had local changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def dataset_info(path: Path) -> dict[str, str]:
    """Version of the training data: a prepared dataset's version (sha256 of manifest + shards), else the sha256
    of an imagefolder's metadata.jsonl; the DVC md5 too when a PATH.dvc file tracks it."""
    path = Path(path)
    info = {"dataset_path": str(path)}
    if is_prepared(path):
        ds = open_prepared(path)
        info |= {"dataset_version": ds.version, "dataset_kind": "prepared", "dataset_name": ds.name}
    elif (path / "metadata.jsonl").is_file():
        # the trainer ingests it into a prepared dataset whose version arrives with the params; this is the source's
        digest = hashlib.sha256((path / "metadata.jsonl").read_bytes()).hexdigest()
        info |= {"dataset_source_sha256": digest, "dataset_kind": "imagefolder"}
    dvc = path.with_name(path.name + ".dvc")
    if dvc.is_file():
        try:
            outs = (yaml.safe_load(dvc.read_text()) or {}).get("outs") or [{}]
            if outs[0].get("md5"):
                info["dataset_dvc_md5"] = str(outs[0]["md5"])
        except yaml.YAMLError:
            log.warning("%s is not valid YAML; DVC hash not recorded", dvc)
    return info


def system_info() -> dict[str, str]:
    info = {"sys.python": platform.python_version(), "sys.platform": platform.platform(),
            "sys.cpu_count": str(os.cpu_count()), "sys.torch": torch.__version__,
            "sys.device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        info |= {"sys.diffusers": version("diffusers"), "sys.mlflow": version("mlflow")}
    except Exception:  # a missing distribution only loses a tag
        pass
    return info


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted MLflow params (lists as JSON; values cut to MLflow's 6000-character limit)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:6000]
    return out


# ------------------------------------------------------------------ the logger


class MLflowLogger:
    """MetricsLogger that writes to one MLflow run. The run is created at the first log call (a training that
    stops on bad input leaves no empty run). If the store fails mid-training after the retries, the logger
    turns itself off with a warning: training goes on, local checkpoints and metrics.jsonl stay, and `failed`
    says why (the CLI then tells the user to run `diffuse train --log-only RUN_DIR`)."""

    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.tc = cfg.tracking
        self.run_dir = Path(cfg.run_dir)
        self.client, self.experiment_id = connect(self.tc)
        self.run_id: str | None = None
        self.failed: str | None = None
        self._skip_until = -1  # on resume: steps the run already has (training after a resume is bit-identical)
        record = read_run_file(self.run_dir) if resume else None
        if record and record.get("tracking_uri") == tracking_uri(self.tc):
            self._resume(record["run_id"])

    def _resume(self, run_id: str) -> None:
        def reopen():
            self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "loss")
            return max((m.step for m in history), default=-1)

        try:
            self._skip_until = with_retries(reopen, self.tc, f"reopen run {run_id}")
            self.run_id = run_id
            log.info("continuing MLflow run %s", run_id)
        except TrackingUnavailable:
            raise
        except Exception as e:  # the run was deleted: start a new one rather than fail the training
            log.warning("MLflow run %s cannot be continued (%s); a new run is started", run_id, short(e))

    def _ensure_run(self) -> str:
        if self.run_id is None:
            tags = {"run_dir": str(self.run_dir.resolve()), **git_info(), **dataset_info(self.cfg.data.path),
                    **system_info()}
            run = with_retries(lambda: self.client.create_run(self.experiment_id, tags=tags,
                                                              run_name=self.run_dir.name), self.tc, "create a run")
            self.run_id = run.info.run_id
            write_run_file(self.run_dir, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                                           "tracking_uri": tracking_uri(self.tc)})
            if "dataset_version" in tags:
                self._log_dataset(tags["dataset_version"])
        return self.run_id

    def _log_dataset(self, dataset_version: str) -> None:
        """Tag the run with the version of the data it trains on, and log that dataset as an MLflow dataset input
        (the UI's "Datasets used")."""
        path = Path(self.cfg.data.path)
        ds = Dataset(name=path.name, digest=dataset_version[:36], source_type="local",
                     source=json.dumps({"uri": str(path.resolve())}))
        inp = DatasetInput(ds, [InputTag("mlflow.data.context", "training")])
        self._call(lambda: self.client.set_tag(self.run_id, "dataset_version", dataset_version), "tag the run")
        self._call(lambda: self.client.log_inputs(self.run_id, datasets=[inp]), "log the dataset input")

    def _call(self, fn: Callable[[], object], what: str) -> None:
        if self.failed:
            return
        try:
            with_retries(fn, self.tc, what)
        except TrackingUnavailable as e:
            self.failed = str(e)
            log.warning("%s -- MLflow logging is off for the rest of this training; local metrics and "
                        "checkpoints continue", e)

    def log_params(self, params: dict) -> None:
        if self.failed:
            return
        self._call(self._ensure_run, "create a run")
        config = params.get("config", {})
        flat = flatten(config) | {k: str(v) for k, v in params.items() if k != "config"}
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk),
                       "log params")
        if config:
            self._call(lambda: self.client.log_dict(self.run_id, config, "config.yaml"), "log the config")
        if params.get("dataset_version"):
            self._log_dataset(str(params["dataset_version"]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.failed or step <= self._skip_until:
            return
        self._call(self._ensure_run, "create a run")
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=batch), "log metrics")

    def log_image(self, path: Path, step: int) -> None:
        if self.failed or step <= self._skip_until:
            return
        self._call(self._ensure_run, "create a run")
        with Image.open(path) as im:
            image = im.convert("RGB")
        # key + step: MLflow's step-indexed images (the UI shows them with a step slider)
        self._call(lambda: self.client.log_image(self.run_id, image, key="samples", step=step), "log an image")

    def log_folder(self, folder: Path, artifact_path: str) -> None:
        """Files of a folder as run artifacts (a trained VAE: RUN_DIR/vae -> artifacts/vae)."""
        if self.run_id is None or self.failed:
            return
        self._call(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path), "log " + artifact_path)

    def finish(self, model_dir: Path | None = None, status: str = "FINISHED", new_model: bool = True) -> None:
        """End of training: log the model (pyfunc, see pipeline/registry/versions.py) and close the run. A resumed
        training wrote a new model: it is logged again (new_model) and mlflow_run.json points at it."""
        if self.run_id is None or self.failed:
            return
        if model_dir is not None:
            self._call(lambda: log_pyfunc(self.run_id, Path(model_dir), self.run_dir, new_model),
                       "log the model")
        self._call(lambda: self.client.set_terminated(self.run_id, status), "close the run")


# ------------------------------------------------------------------ logging a finished run later


def log_only(run_dir: Path, tc: TrackingConfig | None = None) -> str:
    """Log a finished local run (config.yaml, metrics.jsonl, sample grids, RUN_DIR/model) to MLflow; continues
    the run in mlflow_run.json when there is one and only adds what it lacks. Returns the run id."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run_dir} is not a training run: no config.yaml (train with `diffuse train` first)")
    cfg = load_saved_config(cfg_file)
    if tc is not None:
        cfg = cfg.model_copy(update={"tracking": tc})
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    model_dir = run_dir / "model"
    if not (model_dir / "conditioning.json").is_file():
        raise UserError(f"{run_dir} has no finished model ({model_dir}): resume the training first")
    logger = MLflowLogger(cfg, resume=True)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    logger._skip_until = -1  # compare per metric below instead: a failed run may have logged only part
    run_id = logger._ensure_run()
    have = _logged_steps(logger.client, run_id)
    params_logged = bool(logger.client.get_run(run_id).data.params)
    for rec in records:
        if "params" in rec and not params_logged:
            logger.log_params(rec["params"])
            params_logged = True
        elif "image" in rec:
            image = Path(rec["image"])
            image = image if image.is_absolute() or image.exists() else run_dir / "samples" / image.name
            if image.is_file() and rec["step"] not in have.get("samples", set()):
                logger.log_image(image, rec["step"])
        elif "step" in rec:
            metrics = {k: v for k, v in rec.items() if k not in ("time", "step") and isinstance(v, int | float)
                       and rec["step"] not in have.get(k, set())}
            if metrics:
                logger.log_metrics(metrics, rec["step"])
    if not params_logged:
        logger.log_params({"config": cfg.model_dump(mode="json")})
    logger.finish(model_dir, new_model=False)
    if logger.failed:
        raise TrackingUnavailable(logger.failed)
    return run_id


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON; skipped", path, n)
    return out


def _logged_steps(client, run_id: str) -> dict[str, set[int]]:
    """Steps already in the run, per metric (and 'samples' for step-indexed images)."""
    run = client.get_run(run_id)
    have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in run.data.metrics}
    # step-indexed images are stored as images/KEY+step+N+timestamp+... (older MLflow: % instead of +)
    pattern = re.compile(r"images/samples[+%]step[+%](\d+)[+%]")
    have["samples"] = {int(m.group(1)) for a in client.list_artifacts(run_id, "images")
                       if (m := pattern.match(a.path))}
    return have
