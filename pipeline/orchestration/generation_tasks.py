"""The tasks of the batch_generate DAG: resolve_champion -> split -> generate (one per shard) -> collect.
dags/ only wires them; what travels between them is the pinned model version, shard names and shard summaries.
Nothing here needs the `data` extra (Great Expectations, DVC)."""

from __future__ import annotations

import dataclasses

from pipeline.config import GenerationConfig, load_section
from pipeline.generation.batch import generate_shard, new_run_id, pending_prompts, resolve_version, shard_of
from pipeline.generation.gallery import write_gallery
from pipeline.generation.prompt_store import store_url
from pipeline.orchestration.dag_common import config_path, in_workspace


def resolve_champion(params: dict) -> dict:
    """Pin the alias to one version for the whole run (a champion that moves mid-run does not split it)."""
    with in_workspace():
        model = resolve_version(params["model"], str(config_path(params["config"])))
    return model | {"generation_run": new_run_id()}


def split(model: dict, params: dict) -> list[str]:
    """The shards that have pending prompts for this version (none: nothing to do, the rest is skipped)."""
    n = params["shards"]
    with in_workspace():
        url = store_url(load_section(config_path(params["config"]), "generation", GenerationConfig))
        pending = pending_prompts(url, model["name"], model["version"])
    busy = sorted({shard_of(pid, n) for pid in pending})
    print(f"{len(pending)} pending prompts for {model['name']} v{model['version']} in shards {busy} of {n}")
    return [f"{i}/{n}" for i in busy]


def generate(shard: str, model: dict, params: dict) -> dict:
    with in_workspace():
        summary = generate_shard(model["uri"], shard, run_id=model["generation_run"], limit=params["limit"],
                                 config=str(config_path(params["config"])))
    record = dataclasses.asdict(summary)  # what the collect task reads (XCom carries JSON)
    return {k: record[k] for k in ("run_id", "shard", "prompts", "images", "images_already_done", "done", "failed",
                                   "seconds")}


def collect(summaries: list[dict], model: dict, params: dict) -> dict:
    """The run's manifest, summary and gallery (over every shard), logged to MLflow."""
    with in_workspace():
        out = write_gallery(model["generation_run"], config=str(config_path(params["config"])),
                            summaries=list(summaries))
    failed = [f for s in summaries for f in s["failed"]]
    return {"model": model["uri"], "run_id": model["generation_run"], "images": sum(s["images"] for s in summaries),
            "failed_prompts": len(failed), **{k: out[k] for k in ("manifest", "gallery") if k in out}}
