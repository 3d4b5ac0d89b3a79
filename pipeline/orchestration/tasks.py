"""What each task of the DAGs in dags/ does. The DAG files only wire these together: each task calls one function
here with its DAG run's params and what the tasks before it returned, and returns a small JSON-able dict (paths,
versions, URIs, metrics) for the next. Every function runs inside the workspace (dag_common.in_workspace).

    dataset_update:  ingest -> validate -> version
    retrain:         pull -> gate -> train -> evaluate -> register -> promote -> (champion changed) publish
    batch_generate:  resolve_champion -> split -> generate (one per shard) -> collect
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from airflow.sdk.exceptions import AirflowFailException

from pipeline.config import (
    EvaluationConfig,
    GenerationConfig,
    PromotionConfig,
    TrackingConfig,
    load_config,
    load_section,
)
from pipeline.data.ingest import ingest as ingest_source
from pipeline.data.prepared import dataset_dir
from pipeline.data.validation import config_from_file, validate_dataset
from pipeline.data.versioning import add_and_push, dataset_version
from pipeline.data.versioning import pull as dvc_pull
from pipeline.evaluation.protocol import evaluate as evaluate_model
from pipeline.evaluation.protocol import load_report, save_report
from pipeline.generation.batch import generate_shard, new_run_id, pending_prompts, resolve_version, shard_of
from pipeline.generation.gallery import write_gallery
from pipeline.generation.prompt_store import store_url
from pipeline.orchestration.dag_common import WORKSPACE, config_path, in_workspace
from pipeline.orchestration.runners import run_local
from pipeline.registry.versions import promote as promote_challenger
from pipeline.registry.versions import register as register_run

# ------------------------------------------------------------------ dataset_update


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


def _gate(dataset: str, version: str, config: Path, what: str) -> str:
    """The Great Expectations gate; a hard failure fails the task without retries (a verdict on the data)."""
    result = validate_dataset(dataset, config_from_file(config))
    if not result.success:
        failed = "; ".join(f"{c.name}: {c.observed}" for c in result.hard_failures)
        raise AirflowFailException(f"dataset {version[:12]} failed validation{what} ({failed}); report: "
                                   f"{result.report}")
    return result.report


def validate(prepared: dict, params: dict) -> dict:
    return prepared | {"validation": _gate(prepared["dataset"], prepared["version"], config_path(params["config"]),
                                           "")}


def version(prepared: dict) -> dict:
    """`dvc add` + `dvc push` of the prepared dataset: the Asset event the task emits carries the result."""
    with in_workspace() as ws:
        md5 = add_and_push(ws, prepared["dataset"])
    return prepared | {"dvc_md5": md5}


# ------------------------------------------------------------------ retrain


def _sections(config: str) -> tuple[TrackingConfig, EvaluationConfig, PromotionConfig]:
    path = config_path(config)
    return (load_section(path, "tracking", TrackingConfig), load_section(path, "evaluation", EvaluationConfig),
            load_section(path, "promotion", PromotionConfig))


def retrain_run_dir(run_id: str) -> Path:
    """The training run folder of a retrain DAG run: one per DAG run, so a retried train task resumes it."""
    return WORKSPACE / "runs" / "retrain" / re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id)


def pull(params: dict, run_id: str) -> dict:
    """The dataset version to train on, fetched from the DVC remote, and a run folder unique to this DAG run."""
    with in_workspace() as ws:
        path = dataset_dir(params["dataset"]).resolve()
        md5 = dvc_pull(ws, path)
    return {"dataset": str(path), "version": dataset_version(path), "dvc_md5": md5,
            "config": str(config_path(params["config"])), "run_dir": str(retrain_run_dir(run_id))}


def gate(plan: dict) -> dict:
    _gate(plan["dataset"], plan["version"], Path(plan["config"]), ", not training")
    return plan


def train_locally(plan: dict, params: dict) -> dict:
    """The `local` runner: `diffuse train` in a subprocess of this environment (Docker and Kubernetes runners are
    operators, built in the DAG file)."""
    run_local(plan["config"], plan["dataset"], plan["run_dir"], cwd=WORKSPACE, overrides=params["overrides"])
    return plan


def evaluate(plan: dict, params: dict) -> dict:
    _, ec, _ = _sections(params["config"])
    with in_workspace():
        report = evaluate_model(Path(plan["run_dir"]) / "model", ec)
    out = save_report(report, Path(plan["run_dir"]) / "evaluation.json")
    return plan | {"evaluation": str(out), "metrics": report["metrics"]}


def register(plan: dict, params: dict) -> dict:
    tc, ec, _ = _sections(params["config"])
    with in_workspace():
        reg = register_run(plan["run_dir"], params["model_name"], tc, ec, report=load_report(plan["evaluation"]))
    return {"name": reg.name, "version": reg.version, "created": reg.created}


def promote(registered: dict, params: dict) -> dict:
    tc, ec, pc = _sections(params["config"])
    with in_workspace():
        decision = promote_challenger(registered["name"], tc, ec, pc)
    return {"name": registered["name"], "challenger": registered["version"], "decision": decision.decision,
            "champion": decision.champion_after, "reasons": decision.reasons}


def champion_event(decision: dict) -> dict:
    """What the model Asset event says when `champion` moved."""
    return {"model": f"models:/{decision['name']}@champion", "name": decision["name"], "version": decision["champion"]}


# ------------------------------------------------------------------ batch_generate


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
