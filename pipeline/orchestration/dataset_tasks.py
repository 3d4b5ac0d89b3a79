"""The tasks of the dataset_update DAG: ingest -> validate -> version (dags/ only wires them; each takes the DAG
run's params and what the task before returned, and returns a small JSON-able dict: paths, versions)."""

from __future__ import annotations

from pathlib import Path

from airflow.sdk.exceptions import AirflowFailException

from pipeline.config import load_config
from pipeline.data.ingest import ingest as ingest_source
from pipeline.data.prepared import dataset_dir
from pipeline.data.validation import config_from_file, validate_dataset
from pipeline.data.versioning import add_and_push
from pipeline.orchestration.dag_common import config_path, in_workspace


def ingest(params: dict) -> dict:
    """params: source, name, config -> the prepared dataset's path and version."""
    cfg = load_config(config_path(params["config"]))
    with in_workspace():
        out = dataset_dir(params["name"]).resolve()
        info = ingest_source(params["source"], out, cfg.data.resolution, cfg.ingest,
                             caption_column=cfg.data.caption_column, label_column=cfg.data.label_column,
                             condition_column=cfg.data.condition_column, name=params["name"], progress=False)
    return {"dataset": str(out), "version": info["version"], "items": info["num_items"],
            "quarantined": info["num_quarantined"]}


def data_gate(dataset: str, version: str, config: Path, what: str) -> str:
    """The Great Expectations gate; a hard failure fails the task without retries (a verdict on the data)."""
    result = validate_dataset(dataset, config_from_file(config))
    if not result.success:
        failed = "; ".join(f"{c.name}: {c.observed}" for c in result.hard_failures)
        raise AirflowFailException(f"dataset {version[:12]} failed validation{what} ({failed}); report: "
                                   f"{result.report}")
    return result.report


def validate(prepared: dict, params: dict) -> dict:
    return prepared | {"validation": data_gate(prepared["dataset"], prepared["version"], config_path(params["config"]),
                                           "")}


def version(prepared: dict) -> dict:
    """`dvc add` + `dvc push` of the prepared dataset: the Asset event the task emits carries the result."""
    with in_workspace() as ws:
        md5 = add_and_push(ws, prepared["dataset"])
    return prepared | {"dvc_md5": md5}
