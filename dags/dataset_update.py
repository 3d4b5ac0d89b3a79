"""dataset_update: ingest -> validate (Great Expectations gate) -> DVC add + push -> dataset Asset event.

Trigger it with a source (imagefolder, CSV, WebDataset .tar folder or s3:// prefix); `retrain` follows the
Asset event it emits.
"""

from __future__ import annotations

import os

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.orchestration import DAG_DEFAULTS, DATASET_ASSET, DATASET_NAME, config_path, in_workspace


@dag(
    schedule=None,
    **DAG_DEFAULTS,
    tags=["diffuse", "data"],
    params={
        "source": Param(os.environ.get("DIFFUSE_SOURCE", "data/shapes"), type="string",
                        description="imagefolder, .csv, WebDataset .tar folder or s3:// prefix"),
        "name": Param(DATASET_NAME, type="string", description="dataset name: data/prepared/NAME"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
    },
    doc_md=__doc__,
)
def dataset_update():
    @task
    def ingest() -> dict:
        from pipeline.config import load_config
        from pipeline.ingest import ingest as run_ingest
        from pipeline.prepared import dataset_dir

        p = get_current_context()["params"]
        cfg = load_config(config_path(p["config"]))
        with in_workspace():
            out = dataset_dir(p["name"]).resolve()
            info = run_ingest(p["source"], out, cfg.data.resolution, cfg.ingest, caption_column=cfg.data.caption_column,
                              label_column=cfg.data.label_column, name=p["name"], progress=False)
        return {"dataset": str(out), "version": info["version"], "items": info["num_items"],
                "quarantined": info["num_quarantined"]}

    @task(retries=0)  # a failed gate is a verdict on the data, not a transient fault
    def validate(prepared: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.validate import config_from_file, validate_dataset

        p = get_current_context()["params"]
        result = validate_dataset(prepared["dataset"], config_from_file(config_path(p["config"])))
        if not result.success:
            failed = "; ".join(f"{c.name}: {c.observed}" for c in result.hard_failures)
            raise AirflowFailException(f"dataset {prepared['version'][:12]} failed validation ({failed}); report: "
                                       f"{result.report}")
        return prepared | {"validation": result.report}

    @task(outlets=[DATASET_ASSET])
    def version(prepared: dict) -> dict:
        from pipeline.versioning import add_and_push

        with in_workspace() as ws:
            md5 = add_and_push(ws, prepared["dataset"])
        event = {"dataset": prepared["dataset"], "version": prepared["version"], "dvc_md5": md5}
        get_current_context()["outlet_events"][DATASET_ASSET].extra = event
        return prepared | event

    version(validate(ingest()))


dataset_update_dag = dataset_update()
