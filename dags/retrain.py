"""retrain: weekly and whenever the dataset Asset updates.

DVC pull -> validation gate -> [train_vae: $DIFFUSE_TRAIN_VAE] -> train (local subprocess, Docker or Kubernetes GPU
job: $DIFFUSE_RUNNER_KIND) -> evaluate -> register as `challenger` -> promotion gate -> model Asset event when
`champion` changed.
What each task does: pipeline/orchestration/retrain_tasks.py
(imported when a task runs, so parsing this file stays cheap).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipeline.orchestration.dag_common import DAG_DEFAULTS, DATASET_ASSET, MODEL_ASSET, SETTINGS
from pipeline.orchestration.runners import (
    docker_operator_kwargs,
    kubernetes_operator_kwargs,
    runner_config,
    vae_override,
    vae_run_dir,
)

RUNNER = runner_config()  # environment only: the operator is chosen at parse time without touching the DB
TRAIN_TIMEOUT = timedelta(hours=RUNNER.timeout_hours)


@dag(
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"),
                                 assets=DATASET_ASSET),
    **DAG_DEFAULTS,
    tags=["diffuse", "training"],
    params={
        "dataset": Param(SETTINGS.dataset_name, type="string",
                         description="prepared dataset name (data/prepared/NAME)"),
        "model_name": Param(SETTINGS.model_name, type="string", description="registered model name"),
        "config": Param("", type="string", description="config file (default: $DIFFUSE_CONFIG)"),
        "overrides": Param([], type="array", description="training config overrides KEY=VALUE (e.g. "
                           "train.cycles.1.steps=500)"),
    },
    doc_md=__doc__,
)
def retrain():
    @task
    def pull() -> dict:
        """The dataset version to train on, fetched from the DVC remote."""
        from pipeline.orchestration import retrain_tasks as tasks

        ctx = get_current_context()
        return tasks.pull(ctx["params"], ctx["run_id"])

    @task(retries=0)  # a failed gate is a verdict on the data, not a transient fault
    def gate(plan: dict) -> dict:
        from pipeline.orchestration import retrain_tasks as tasks

        return tasks.gate(plan)

    if RUNNER.kind == "local":
        @task(execution_timeout=TRAIN_TIMEOUT)
        def train_vae(plan: dict) -> dict:
            from pipeline.orchestration import retrain_tasks as tasks

            return tasks.train_vae_locally(plan)

        @task(execution_timeout=TRAIN_TIMEOUT)
        def train(plan: dict) -> dict:
            from pipeline.orchestration import retrain_tasks as tasks

            return tasks.train_locally(plan, get_current_context()["params"])

        planned = gate(pull())
        trained = train(train_vae(planned) if SETTINGS.train_vae else planned)
    else:
        planned = gate(pull())
        xcom = "{{ ti.xcom_pull(task_ids='gate')['%s'] }}"
        args = (xcom % "config", xcom % "dataset", xcom % "run_dir")
        # (task, command, run folder, overrides): the VAE first when the deployment trains one
        steps = [("train", "train", args[2], [])]
        if SETTINGS.train_vae:
            steps = [("train_vae", "train-vae", vae_run_dir(args[2]), []),
                     ("train", "train", args[2], [vae_override(args[2])])]
        if RUNNER.kind == "docker":
            from airflow.providers.docker.operators.docker import DockerOperator as Operator

            operator_kwargs = docker_operator_kwargs
        else:
            from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator as Operator

            operator_kwargs = kubernetes_operator_kwargs
        jobs = [Operator(task_id=task_id, execution_timeout=TRAIN_TIMEOUT,
                         **operator_kwargs(RUNNER, args[0], args[1], run_dir, command=command, overrides=overrides))
                for task_id, command, run_dir, overrides in steps]
        job = jobs[-1]
        planned >> jobs[0]
        if len(jobs) == 2:
            jobs[0] >> jobs[1]

        @task
        def trained_plan(plan: dict) -> dict:
            return plan

        trained = trained_plan(planned)
        job >> trained

    @task
    def evaluate(plan: dict) -> dict:
        from pipeline.orchestration import retrain_tasks as tasks

        return tasks.evaluate(plan, get_current_context()["params"])

    @task
    def register(plan: dict) -> dict:
        from pipeline.orchestration import retrain_tasks as tasks

        return tasks.register(plan, get_current_context()["params"])

    @task
    def promote(registered: dict) -> dict:
        from pipeline.orchestration import retrain_tasks as tasks

        return tasks.promote(registered, get_current_context()["params"])

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def champion_changed(decision: dict) -> bool:
        return decision["decision"] == "promoted"

    @task(outlets=[MODEL_ASSET])
    def publish(decision: dict) -> dict:
        from pipeline.orchestration import retrain_tasks as tasks

        event = tasks.champion_event(decision)
        get_current_context()["outlet_events"][MODEL_ASSET].extra = event
        return event

    decision = promote(register(evaluate(trained)))
    champion_changed(decision) >> publish(decision)


retrain_dag = retrain()
