"""What the DAGs in dags/ share: the Assets that chain them, retry/timeout defaults, and where they work.

Only environment variables are read here (at parse time); never Airflow Variables, Connections or the
metadata database. Tasks resolve everything else when they run.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset

from pipeline.config import DagConfig, from_environment

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the project folder (dags/, configs/)
SETTINGS = from_environment(DagConfig, "DIFFUSE_")  # DIFFUSE_WORKSPACE, DIFFUSE_CONFIG, ... (pipeline/config.py)
WORKSPACE = SETTINGS.workspace or PROJECT_ROOT

# Asset events carry the versions in `extra`; only URIs and versions travel between DAGs and tasks.
DATASET_ASSET = Asset(name="diffuse_dataset", uri="diffuse://datasets/prepared")
MODEL_ASSET = Asset(name="diffuse_champion", uri="diffuse://models/champion")

DEFAULT_ARGS = {
    "owner": "diffuse",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=1),
}

# What every DAG here shares: no backfill of missed schedules, one run at a time.
DAG_DEFAULTS = {"start_date": pendulum.datetime(2026, 1, 1, tz="UTC"), "catchup": False, "max_active_runs": 1,
                "default_args": DEFAULT_ARGS}


def config_path(value: str | None = None) -> Path:
    """A DAG run's config file (its `config` param, else DIFFUSE_CONFIG); relative paths are the project's."""
    path = Path(value or SETTINGS.config)
    return path if path.is_absolute() else PROJECT_ROOT / path


@contextlib.contextmanager
def in_workspace():
    """Run a task body inside the workspace, so the config's relative paths (runs/, .cache/) land there."""
    before = Path.cwd()
    WORKSPACE.mkdir(parents=True, exist_ok=True)
    os.chdir(WORKSPACE)
    try:
        yield WORKSPACE
    finally:
        os.chdir(before)
