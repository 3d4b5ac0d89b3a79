"""retrain: weekly and whenever the dataset Asset updates.

DVC pull -> validation gate -> train (local subprocess, Docker or Kubernetes GPU job: $DIFFUSE_RUNNER_KIND)
-> evaluate -> register as `challenger` -> promotion gate -> model Asset event when `champion` changed.
"""

from __future__ import annotations

import re
from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipeline.orchestration import (
    DAG_DEFAULTS,
    DATASET_ASSET,
    DATASET_NAME,
    MODEL_ASSET,
    MODEL_NAME,
    WORKSPACE,
    config_path,
    in_workspace,
)
from pipeline.runners import docker_operator_kwargs, kubernetes_operator_kwargs, runner_config

RUNNER = runner_config()  # environment only: the operator is chosen at parse time without touching the DB
TRAIN_TIMEOUT = timedelta(hours=RUNNER.timeout_hours)


def _tracking(config: str):
    from pipeline.config import EvaluationConfig, PromotionConfig, TrackingConfig, load_section

    path = config_path(config)
    return (load_section(path, "tracking", TrackingConfig), load_section(path, "evaluation", EvaluationConfig),
            load_section(path, "promotion", PromotionConfig))


@dag(
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"),
                                 assets=DATASET_ASSET),
    **DAG_DEFAULTS,
    tags=["diffuse", "training"],
    params={
        "dataset": Param(DATASET_NAME, type="string", description="prepared dataset name (data/prepared/NAME)"),
        "model_name": Param(MODEL_NAME, type="string", description="registered model name"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
        "overrides": Param([], type="array", description="training config overrides KEY=VALUE (e.g. "
                           "train.max_steps=100)"),
    },
    doc_md=__doc__,
)
def retrain():
    @task
    def pull() -> dict:
        """The dataset version to train on, fetched from the DVC remote."""
        from pipeline.prepared import dataset_dir
        from pipeline.versioning import dataset_version
        from pipeline.versioning import pull as dvc_pull

        ctx = get_current_context()
        with in_workspace() as ws:
            path = dataset_dir(ctx["params"]["dataset"]).resolve()
            md5 = dvc_pull(ws, path)
        safe_run = re.sub(r"[^A-Za-z0-9_.-]+", "-", ctx["run_id"])
        return {"dataset": str(path), "version": dataset_version(path), "dvc_md5": md5,
                "config": str(config_path(ctx["params"]["config"])),
                "run_dir": str(WORKSPACE / "runs" / "retrain" / safe_run)}

    @task(retries=0)
    def gate(plan: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.validate import config_from_file, validate_dataset

        result = validate_dataset(plan["dataset"], config_from_file(plan["config"]))
        if not result.success:
            failed = "; ".join(f"{c.name}: {c.observed}" for c in result.hard_failures)
            raise AirflowFailException(f"dataset {plan['version'][:12]} failed validation, not training: {failed}")
        return plan

    if RUNNER.kind == "local":
        @task(execution_timeout=TRAIN_TIMEOUT)
        def train(plan: dict) -> dict:
            from pipeline.runners import run_local

            overrides = get_current_context()["params"]["overrides"]
            run_local(plan["config"], plan["dataset"], plan["run_dir"], cwd=WORKSPACE, overrides=overrides)
            return plan

        trained = train(gate(pull()))
    else:
        planned = gate(pull())
        xcom = "{{ ti.xcom_pull(task_ids='gate')['%s'] }}"
        args = (xcom % "config", xcom % "dataset", xcom % "run_dir")
        if RUNNER.kind == "docker":
            from airflow.providers.docker.operators.docker import DockerOperator

            job = DockerOperator(task_id="train", execution_timeout=TRAIN_TIMEOUT,
                                 **docker_operator_kwargs(RUNNER, *args))
        else:
            from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

            job = KubernetesPodOperator(task_id="train", execution_timeout=TRAIN_TIMEOUT,
                                        **kubernetes_operator_kwargs(RUNNER, *args))
        planned >> job

        @task
        def trained_plan(plan: dict) -> dict:
            return plan

        trained = trained_plan(planned)
        job >> trained

    @task
    def evaluate(plan: dict) -> dict:
        from pathlib import Path

        from pipeline.evaluation import evaluate as run_eval
        from pipeline.evaluation import save_report

        _, ec, _ = _tracking(get_current_context()["params"]["config"])
        with in_workspace():
            report = run_eval(Path(plan["run_dir"]) / "model", ec)
        out = save_report(report, Path(plan["run_dir"]) / "evaluation.json")
        return plan | {"evaluation": str(out), "metrics": report["metrics"]}

    @task
    def register(plan: dict) -> dict:
        from pipeline.evaluation import load_report
        from pipeline.registry import register as run_register

        tc, ec, _ = _tracking(get_current_context()["params"]["config"])
        with in_workspace():
            reg = run_register(plan["run_dir"], get_current_context()["params"]["model_name"], tc, ec,
                               report=load_report(plan["evaluation"]))
        return {"name": reg["name"], "version": reg["version"], "created": reg["created"]}

    @task
    def promote(reg: dict) -> dict:
        from pipeline.registry import promote as run_promote

        tc, ec, pc = _tracking(get_current_context()["params"]["config"])
        with in_workspace():
            decision = run_promote(reg["name"], tc, ec, pc)
        return {"name": reg["name"], "challenger": reg["version"], "decision": decision["decision"],
                "champion": decision.get("version") if decision["decision"] == "promoted" else
                decision.get("champion_before"), "reasons": decision.get("reasons", [])}

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def champion_changed(decision: dict) -> bool:
        return decision["decision"] == "promoted"

    @task(outlets=[MODEL_ASSET])
    def publish(decision: dict) -> dict:
        event = {"model": f"models:/{decision['name']}@champion", "name": decision["name"],
                 "version": decision["champion"]}
        get_current_context()["outlet_events"][MODEL_ASSET].extra = event
        return event

    decision = promote(register(evaluate(trained)))
    champion_changed(decision) >> publish(decision)


retrain_dag = retrain()
