"""dataset_update: ingest -> validate (Great Expectations gate) -> DVC add + push -> dataset Asset event.

Trigger it with a source (imagefolder, CSV, WebDataset .tar folder or s3:// prefix); `retrain` follows the
Asset event it emits. What each task does: pipeline/orchestration/dataset_tasks.py
(imported when a task runs, so parsing this file stays cheap).
"""

from __future__ import annotations

from airflow.sdk import Param, dag, get_current_context, task

from pipeline.orchestration.dag_common import DAG_DEFAULTS, DATASET_ASSET, SETTINGS


@dag(
    schedule=None,
    **DAG_DEFAULTS,
    tags=["diffuse", "data"],
    params={
        "source": Param(SETTINGS.source, type="string",
                        description="imagefolder, .csv, WebDataset .tar folder or s3:// prefix"),
        "name": Param(SETTINGS.dataset_name, type="string", description="dataset name: data/prepared/NAME"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
    },
    doc_md=__doc__,
)
def dataset_update():
    @task
    def ingest() -> dict:
        from pipeline.orchestration import dataset_tasks as tasks

        return tasks.ingest(get_current_context()["params"])

    @task(retries=0)  # a failed gate is a verdict on the data, not a transient fault
    def validate(prepared: dict) -> dict:
        from pipeline.orchestration import dataset_tasks as tasks

        return tasks.validate(prepared, get_current_context()["params"])

    @task(outlets=[DATASET_ASSET])
    def version(prepared: dict) -> dict:
        from pipeline.orchestration import dataset_tasks as tasks

        result = tasks.version(prepared)
        event = {k: result[k] for k in ("dataset", "version", "dvc_md5")}
        get_current_context()["outlet_events"][DATASET_ASSET].extra = event
        return result

    version(validate(ingest()))


dataset_update_dag = dataset_update()
