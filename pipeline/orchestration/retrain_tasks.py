"""The tasks of the retrain DAG: pull -> gate -> train -> evaluate -> register -> promote -> (champion changed)
publish. dags/ only wires them; each returns a small JSON-able dict (paths, versions, metrics) for the next."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import EvaluationConfig, PromotionConfig, TrackingConfig, load_section
from pipeline.data.prepared import dataset_dir
from pipeline.data.versioning import dataset_version
from pipeline.data.versioning import pull as dvc_pull
from pipeline.evaluation.protocol import evaluate as evaluate_model
from pipeline.evaluation.protocol import load_report, save_report
from pipeline.orchestration.dag_common import WORKSPACE, config_path, in_workspace
from pipeline.orchestration.dataset_tasks import data_gate
from pipeline.orchestration.runners import run_local, vae_override, vae_run_dir
from pipeline.registry.versions import promote as promote_challenger
from pipeline.registry.versions import register as register_run


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
    data_gate(plan["dataset"], plan["version"], Path(plan["config"]), ", not training")
    return plan


def train_vae_locally(plan: dict) -> dict:
    """The `local` runner's VAE step (DIFFUSE_TRAIN_VAE): `diffuse train-vae` into the run's VAE folder; the
    latent model then trains on it."""
    run_local(plan["config"], plan["dataset"], vae_run_dir(plan["run_dir"]), cwd=WORKSPACE, command="train-vae")
    return plan | {"vae": str(Path(vae_run_dir(plan["run_dir"])) / "vae")}


def train_locally(plan: dict, params: dict) -> dict:
    """The `local` runner: `diffuse train` in a subprocess of this environment (Docker and Kubernetes runners are
    operators, built in the DAG file); a latent model on the VAE the run trained, if it trained one."""
    overrides = [*([vae_override(plan["run_dir"])] if plan.get("vae") else []), *params["overrides"]]
    run_local(plan["config"], plan["dataset"], plan["run_dir"], cwd=WORKSPACE, overrides=overrides)
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
