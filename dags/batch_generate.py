"""batch_generate: daily and whenever `champion` changes.

resolve champion (once: every shard uses the same version) -> list pending prompts -> split into shards ->
mapped generate tasks (one per shard; a failed shard retries alone) -> collect -> manifest, gallery, MLflow.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipeline.orchestration import DAG_DEFAULTS, MODEL_ASSET, MODEL_NAME, config_path, in_workspace


def _config() -> str:
    return str(config_path(get_current_context()["params"]["config"]))


@dag(
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * *", timezone="UTC"), assets=MODEL_ASSET),
    **DAG_DEFAULTS,
    tags=["diffuse", "generation"],
    params={
        "model": Param(f"models:/{MODEL_NAME}@champion", type="string", description="model URI or directory"),
        "shards": Param(int(os.environ.get("DIFFUSE_GENERATE_SHARDS", "2")), type="integer", minimum=1,
                        description="parallel generate tasks (Celery/Kubernetes workers take one each)"),
        "limit": Param(None, type=["null", "integer"], description="at most this many prompts per shard"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
    },
    doc_md=__doc__,
)
def batch_generate():
    @task
    def resolve_champion() -> dict:
        from pipeline.generation import new_run_id, resolve_version

        with in_workspace():
            model = resolve_version(get_current_context()["params"]["model"], _config())
        return model | {"generation_run": new_run_id()}

    @task
    def split(model: dict) -> list[str]:
        """The shards that have pending prompts for this version (none: nothing to do, the rest is skipped)."""
        from pipeline.config import GenerationConfig, load_section
        from pipeline.generation import pending_prompts, shard_of
        from pipeline.prompt_store import store_url

        n = get_current_context()["params"]["shards"]
        with in_workspace():
            url = store_url(load_section(config_path(_config()), "generation", GenerationConfig))
            pending = pending_prompts(url, model["name"], model["version"])
        busy = sorted({shard_of(pid, n) for pid in pending})
        print(f"{len(pending)} pending prompts for {model['name']} v{model['version']} in shards {busy} of {n}")
        return [f"{i}/{n}" for i in busy]

    @task(execution_timeout=timedelta(hours=6))
    def generate(shard: str, model: dict) -> dict:
        from pipeline.generation import generate_shard

        limit = get_current_context()["params"]["limit"]
        with in_workspace():
            summary = generate_shard(model["uri"], shard, run_id=model["generation_run"], limit=limit,
                                     config=_config())
        return {k: summary[k] for k in ("run_id", "shard", "prompts", "images", "images_already_done", "done",
                                        "failed", "seconds")}

    @task
    def collect(summaries: list[dict], model: dict) -> dict:
        from pipeline.gallery import write_gallery

        with in_workspace():
            out = write_gallery(model["generation_run"], config=_config(), summaries=list(summaries))
        failed = [f for s in summaries for f in s["failed"]]
        return {"model": model["uri"], "run_id": model["generation_run"], "images": sum(s["images"] for s in summaries),
                "failed_prompts": len(failed), **{k: out[k] for k in ("manifest", "gallery") if k in out}}

    model = resolve_champion()
    summaries = generate.partial(model=model).expand(shard=split(model))
    collect(summaries, model)


batch_generate_dag = batch_generate()
