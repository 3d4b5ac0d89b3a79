"""Helpers for the MLflow tests: a throwaway MLflow store (real sqlite backend + local artifact folder) and tiny
training runs on the shapes fixture data."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config

# a small, fast protocol: 16 held-out items, 6 fixed shapes prompts (the shapes scorer grades them), 4 steps
EVALUATION = {"num_items": 16, "steps": 4, "prompts": [
    "a small red circle in the top left corner on a white background",
    "a large blue triangle in the center on a black background",
    "a small green square at the bottom on a gray background",
    "a large yellow circle on the right on a white background",
    "a small purple triangle in the bottom left corner on a black background",
    "a large orange square at the top on a gray background",
]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_store(root: Path):
    """MLFLOW_TRACKING_URI -> a fresh sqlite file under `root`; yields the URI."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(None)


def tracking_section(root: Path, **extra) -> dict:
    return {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": (root / "mlartifacts").as_uri(), "experiment": "tests", "sample_every": 0,
            "sample_steps": 2, **extra}


def run_config(tmp: Path, data: Path, store_root: Path | None = None, **sections) -> dict:
    """A tiny training config with an eval split and, when store_root is given, MLflow tracking into it."""
    sections.setdefault("ingest", {}).setdefault("eval_fraction", 0.25)
    if store_root is not None:
        sections["tracking"] = tracking_section(store_root, **sections.get("tracking", {}))
    return tiny_config(tmp, data, **sections)


def train_run(tmp: Path, data: Path, **train) -> Path:
    """Train a tiny model without tracking; returns its run directory."""
    from pipeline.config import Config
    from pipeline.training.loop import train as run_training

    cfg = Config.model_validate(run_config(tmp, data, train=train))
    run_training(cfg, progress=False)
    return Path(cfg.run_dir)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def env_with_venv_path() -> dict:
    """`mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH."""
    import sys

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
