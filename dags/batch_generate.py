"""batch_generate: daily and whenever `champion` changes.

resolve champion (once: every shard uses the same version) -> list pending prompts -> split into shards ->
mapped generate tasks (one per shard; a failed shard retries alone) -> collect -> manifest, gallery, MLflow.
What each task does: pipeline/orchestration/generation_tasks.py
(imported when a task runs, so parsing this file stays cheap).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipeline.orchestration.dag_common import DAG_DEFAULTS, MODEL_ASSET, SETTINGS


@dag(
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * *", timezone="UTC"), assets=MODEL_ASSET),
    **DAG_DEFAULTS,
    tags=["diffuse", "generation"],
    params={
        "model": Param(f"models:/{SETTINGS.model_name}@champion", type="string",
                       description="model URI or directory"),
        "shards": Param(SETTINGS.generate_shards, type="integer", minimum=1,
                        description="parallel generate tasks (Celery/Kubernetes workers take one each)"),
        "limit": Param(None, type=["null", "integer"], description="at most this many prompts per shard"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
    },
    doc_md=__doc__,
)
def batch_generate():
    @task
    def resolve_champion() -> dict:
        from pipeline.orchestration import generation_tasks as tasks

        return tasks.resolve_champion(get_current_context()["params"])

    @task
    def split(model: dict) -> list[str]:
        """The shards that have pending prompts for this version (none: nothing to do, the rest is skipped)."""
        from pipeline.orchestration import generation_tasks as tasks

        return tasks.split(model, get_current_context()["params"])

    @task(execution_timeout=timedelta(hours=6))
    def generate(shard: str, model: dict) -> dict:
        from pipeline.orchestration import generation_tasks as tasks

        return tasks.generate(shard, model, get_current_context()["params"])

    @task
    def collect(summaries: list[dict], model: dict) -> dict:
        from pipeline.orchestration import generation_tasks as tasks

        return tasks.collect(summaries, model, get_current_context()["params"])

    model = resolve_champion()
    summaries = generate.partial(model=model).expand(shard=split(model))
    collect(summaries, model)


batch_generate_dag = batch_generate()
