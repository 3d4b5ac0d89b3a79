"""The Airflow DAGs, for real: DagBag import, each DAG end to end with dag.test() on SQLite (tiny configs),
the failure paths, and the operator specs the docker / kubernetes training runners render.

The DVC remote is the local S3 server; MLflow and the prompt store are SQLite files in the workspace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_config
from s3_server import s3_env

DAGS = ROOT / "dags"


def tiny_pipeline_config(ws: Path, source: Path, **sections) -> dict:
    cfg = tiny_config(ws, source, train={"max_steps": 30, "checkpoint_every": 15},
                      ingest={"eval_fraction": 0.1, "workers": 1})
    cfg["run_dir"] = str(ws / "runs" / "manual")
    cfg["tracking"] = {"sample_every": 0, "experiment": "dag-tests"}
    cfg["evaluation"] = {"num_items": 8, "shapes_per_pair": 1, "steps": 4, "timestep_buckets": 2}
    cfg["promotion"] = {"min_adherence": None, "max_copy_rate": None, "max_denoise_mse": 0.9,
                        "margins": {"denoise_mse": 0.0}}
    cfg["validation"] = {"max_near_duplicate_rate": 1.0, "min_caption_vocabulary": 5}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, shapes_data, s3_server):
    """A local AIRFLOW_HOME on SQLite with the project's dags/ folder; the DAG modules imported from there."""
    tmp = tmp_path_factory.mktemp("airflow")
    ws = tmp / "ws"
    cfg_file = tmp / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_pipeline_config(ws, shapes_data)))
    env = {"AIRFLOW_HOME": str(tmp / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "DIFFUSE_WORKSPACE": str(ws), "DIFFUSE_CONFIG": str(cfg_file),
           "DIFFUSE_SOURCE": str(shapes_data), "DIFFUSE_MODEL_NAME": "tiny", "DIFFUSE_DATASET_NAME": "tiny",
           "DVC_REMOTE_URL": "s3://test-bucket/dvc", **s3_env(s3_server)}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.syspath_prepend(str(DAGS))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    import batch_generate
    import dataset_update
    import retrain

    yield {"tmp": tmp, "ws": ws, "config": cfg_file, "s3": s3_server,
           "dataset_update": dataset_update.dataset_update_dag, "retrain": retrain.retrain_dag,
           "batch_generate": batch_generate.batch_generate_dag}
    mp.undo()


def states(dr) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def asset_events(name: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.name == name).order_by(AssetEvent.id)).all()
    return [r[0] for r in rows]


def registry(ws: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")


def test_dagbag_imports_without_touching_the_database(tmp_path):
    """Parse the DAG files with a metadata DB that cannot exist: any parse-time DB, Variable or Connection
    access would fail the import."""
    code = ("from airflow.models.dagbag import DagBag; b = DagBag(); "
            "print(sorted(b.dag_ids)); print(b.import_errors)")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/no/such/dir/airflow.db"}
    for kind in ("local", "docker", "kubernetes"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=env | {"DIFFUSE_RUNNER_KIND": kind})
        assert r.returncode == 0, r.stderr[-2000:]
        ids, errors = r.stdout.strip().splitlines()[-2:]
        assert errors == "{}", errors
        assert ids == "['batch_generate', 'dataset_update', 'retrain']"


def test_retrain_with_a_vae_step_parses_for_every_runner(tmp_path):
    """DIFFUSE_TRAIN_VAE=true: train_vae runs before train, whatever runs the jobs."""
    code = ("from airflow.models.dagbag import DagBag; d = DagBag().dags['retrain']; "
            "print(sorted(d.get_task('train').upstream_task_ids))")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "DIFFUSE_TRAIN_VAE": "true"}
    for kind in ("local", "docker", "kubernetes"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=env | {"DIFFUSE_RUNNER_KIND": kind})
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == "['train_vae']", (kind, r.stdout)


@pytest.fixture(scope="module")
def dataset_run(airflow):
    return airflow["dataset_update"].test(run_conf={"name": "tiny"})


def test_dataset_update_ingests_validates_versions_and_emits_the_asset(airflow, dataset_run):
    from pipeline import storage

    assert states(dataset_run) == {"ingest": "success", "validate": "success", "version": "success"}
    ws = airflow["ws"]
    events = asset_events("diffuse_dataset")
    assert events and events[-1]["version"] == __import__("json").loads(
        (ws / "data/prepared/tiny/dataset.json").read_text())["version"]
    assert (ws / "data/prepared/tiny.dvc").is_file()
    storage._s3.cache_clear()
    assert storage.list_files("s3://test-bucket/dvc/")  # pushed to the S3 remote
    storage._s3.cache_clear()


@pytest.fixture(scope="module")
def first_retrain(airflow, dataset_run):
    return airflow["retrain"].test(run_conf={"dataset": "tiny", "model_name": "tiny"})


def test_retrain_trains_registers_promotes_and_emits_the_model_asset(airflow, first_retrain):
    s = states(first_retrain)
    assert s == {"pull": "success", "gate": "success", "train": "success", "evaluate": "success",
                 "register": "success", "promote": "success", "champion_changed": "success", "publish": "success"}
    rm = registry(airflow["ws"]).get_registered_model("tiny")
    assert str(rm.aliases.get("champion")) == "1"
    assert asset_events("diffuse_champion")[-1] == {"model": "models:/tiny@champion", "name": "tiny", "version": "1"}


def test_a_worse_challenger_leaves_champion_untouched(airflow, first_retrain):
    before = len(asset_events("diffuse_champion"))
    dr = airflow["retrain"].test(run_conf={"dataset": "tiny", "model_name": "tiny",
                                           "overrides": ["train.max_steps=1", "train.warmup_steps=1"]})
    s = states(dr)
    assert s["register"] == "success" and s["promote"] == "success" and s["publish"] == "skipped"
    client = registry(airflow["ws"])
    aliases = {k: str(v) for k, v in client.get_registered_model("tiny").aliases.items()}
    assert aliases == {"champion": "1", "challenger": "2"}
    assert client.get_model_version("tiny", "2").tags.get("promotion.decision") == "rejected"
    assert len(asset_events("diffuse_champion")) == before


def test_a_dataset_failing_validation_stops_retrain_before_training(airflow, first_retrain, monkeypatch):
    cfg = yaml.safe_load(airflow["config"].read_text())
    cfg["validation"]["min_items"] = 10_000  # more than the data has: a hard failure
    bad = airflow["tmp"] / "strict.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    versions_before = len(registry(airflow["ws"]).search_model_versions("name='tiny'"))
    dr = airflow["retrain"].test(run_conf={"dataset": "tiny", "model_name": "tiny", "config": str(bad)})
    s = states(dr)
    assert s["gate"] == "failed" and s["train"] == "upstream_failed" and s["register"] == "upstream_failed"
    assert len(registry(airflow["ws"]).search_model_versions("name='tiny'")) == versions_before


def test_retrain_can_train_the_vae_first_and_a_latent_model_on_it(airflow, first_retrain, monkeypatch):
    """DIFFUSE_TRAIN_VAE=true (read when the DAG file is parsed, so the modules are reloaded under it): train_vae
    writes RUN_DIR-vae/vae, train makes a latent model on it, and it is evaluated and registered like any model."""
    import importlib
    import json

    import retrain

    from pipeline.orchestration import dag_common, retrain_tasks

    cfg = yaml.safe_load(airflow["config"].read_text())
    cfg["vae"] = {"block_out_channels": [8, 16], "norm_num_groups": 4, "batch_size": 8, "max_steps": 4,
                  "warmup_steps": 1, "sample_every": 0, "num_threads": 1}
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "patch_size"} | {"block_out_channels": [16, 16]}
    latent = airflow["tmp"] / "latent.yaml"
    latent.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DIFFUSE_TRAIN_VAE", "true")
    try:
        importlib.reload(dag_common)
        importlib.reload(retrain)
        dr = retrain.retrain_dag.test(run_conf={"dataset": "tiny", "model_name": "tiny-latent",
                                                "config": str(latent)})
    finally:
        monkeypatch.delenv("DIFFUSE_TRAIN_VAE")
        importlib.reload(dag_common)
        importlib.reload(retrain)
    s = states(dr)
    assert s["train_vae"] == "success" and s["train"] == "success" and s["register"] == "success", s
    run_dir = retrain_tasks.retrain_run_dir(dr.run_id)
    spec = json.loads((run_dir / "model" / "conditioning.json").read_text())
    assert spec["vae"]["source"] == str((Path(f"{run_dir}-vae") / "vae").resolve())
    card = registry(airflow["ws"]).get_model_version("tiny-latent", "1").description
    assert "latent space of the VAE" in card


def add_prompts(airflow, texts: list[str]) -> list[int]:
    from pipeline.config import GenerationConfig
    from pipeline.generation.prompt_store import open_store, parse_prompt

    gc = GenerationConfig(steps=4)
    store = open_store(f"sqlite:///{airflow['ws'] / 'prompts.db'}")
    try:
        return store.add([parse_prompt({"text": t}, gc) for t in texts], check=gc)
    finally:
        store.close()


def outputs(airflow) -> list[tuple[int, str, int]]:
    from pipeline.generation.prompt_store import open_store

    store = open_store(f"sqlite:///{airflow['ws'] / 'prompts.db'}")
    try:
        return sorted((o.prompt_id, o.model_version, o.seed) for o, _ in store.outputs())
    finally:
        store.close()


@pytest.fixture(scope="module")
def generated(airflow, first_retrain):
    ids = add_prompts(airflow, ["a small red circle on a white background", "a large blue triangle at the top",
                                "a green square on the left", "a purple circle in the center"])
    return ids, airflow["batch_generate"].test(run_conf={"shards": 2})


def test_batch_generate_makes_each_image_once_with_a_gallery(airflow, generated):
    ids, dr = generated
    s = states(dr)
    assert s["resolve_champion"] == "success" and s["split"] == "success" and s["collect"] == "success"
    assert outputs(airflow) == [(pid, "1", 0) for pid in sorted(ids)]
    result = next(ti for ti in dr.get_task_instances() if ti.task_id == "collect").xcom_pull(task_ids="collect")
    assert result["images"] == 4 and result["failed_prompts"] == 0
    assert Path(airflow["ws"] / result["gallery"]).is_file() or Path(result["gallery"]).is_file()


def test_a_second_batch_generate_generates_nothing_new(airflow, generated):
    before = outputs(airflow)
    dr = airflow["batch_generate"].test(run_conf={"shards": 2})
    s = states(dr)
    assert s["split"] == "success" and s.get("generate", "skipped") == "skipped"
    assert outputs(airflow) == before


def test_a_failing_shard_retries_without_redoing_the_others(airflow, generated, monkeypatch):
    """One shard's first try dies (an injected crash inside the real task); Airflow retries that map index only,
    and every prompt ends with exactly one image."""
    import pipeline.generation.batch as generation
    import pipeline.orchestration.generation_tasks as tasks

    real = tasks.generate_shard
    calls: list[str] = []

    def crash_once(model_uri, shard, **kw):
        calls.append(shard)
        if shard == "1/2" and calls.count("1/2") == 1:
            raise ConnectionError("worker lost (injected)")
        return real(model_uri, shard, **kw)

    monkeypatch.setattr(tasks, "generate_shard", crash_once)  # what the generate task calls
    ids = add_prompts(airflow, [f"a small yellow square, picture {i}" for i in range(6)])
    assert {generation.shard_of(pid, 2) for pid in ids} == {0, 1}  # both shards have work
    dr = airflow["batch_generate"].test(run_conf={"shards": 2})
    tries = {ti.map_index: ti.try_number for ti in dr.get_task_instances() if ti.task_id == "generate"}
    assert calls.count("1/2") == 2 and calls.count("0/2") == 1
    assert tries[1] == 2 and tries[0] == 1
    new = [o for o in outputs(airflow) if o[0] in ids]
    assert sorted(new) == [(pid, "1", 0) for pid in sorted(ids)]


def test_docker_and_kubernetes_runners_render_gpu_jobs(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.docker.operators.docker import DockerOperator

    from pipeline.orchestration.runners import (
        RunnerConfig,
        docker_operator_kwargs,
        kubernetes_operator_kwargs,
        runner_config,
    )

    for name in RunnerConfig().pass_env:  # only what this test sets (other tests' S3 settings may be in os.environ)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    rc = runner_config({"DIFFUSE_RUNNER_KIND": "docker", "DIFFUSE_RUNNER_GPUS": "2",
                        "DIFFUSE_RUNNER_VOLUME": "/srv/diffuse", "DIFFUSE_RUNNER_IMAGE": "reg/diffuse:1.0"})
    op = DockerOperator(task_id="train", **docker_operator_kwargs(rc, "cfg.yaml", "data/prepared/x", "runs/r1"))
    assert op.image == "reg/diffuse:1.0"
    assert op.device_requests[0]["Count"] == 2 and op.device_requests[0]["Capabilities"] == [["gpu"]]
    # 2 GPUs: torchrun starts one DDP process per GPU (pipeline/training/distributed.py)
    assert op.command[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert op.command[6:9] == ["-m", "pipeline.cli", "train"] and "data.path=data/prepared/x" in op.command
    assert op.mounts[0]["Target"] == "/workspace" and op.mounts[0]["Source"] == "/srv/diffuse"
    assert op.environment == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}

    # the VAE step of a latent model: one process (no torchrun), its own run folder, the model trained on it
    op = DockerOperator(task_id="train_vae", **docker_operator_kwargs(rc, "cfg.yaml", "d", "runs/r1-vae",
                                                                      command="train-vae"))
    assert op.command[:4] == ["python", "-m", "pipeline.cli", "train-vae"] and "run_dir=runs/r1-vae" in op.command
    op = DockerOperator(task_id="train", **docker_operator_kwargs(rc, "cfg.yaml", "d", "runs/r1",
                                                                  overrides=["model.vae=runs/r1-vae/vae"]))
    assert "model.vae=runs/r1-vae/vae" in op.command

    rc = runner_config({"DIFFUSE_RUNNER_KIND": "kubernetes", "DIFFUSE_RUNNER_VOLUME": "diffuse-workspace"})
    op = KubernetesPodOperator(task_id="train", **kubernetes_operator_kwargs(rc, "cfg.yaml", "d", "runs/r1"))
    pod = op.build_pod_request_obj(dry_run=True)  # no cluster here: render only
    container = pod.spec.containers[0]
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert container.command == ["python"] and container.args[:3] == ["-m", "pipeline.cli", "train"]
    assert pod.metadata.namespace == "diffuse"
    tolerations = [t.key for t in pod.spec.tolerations or []]
    assert "nvidia.com/gpu" in tolerations  # from the pod template in infra/
    assert pod.spec.volumes[-1].persistent_volume_claim.claim_name == "diffuse-workspace"
    env = {e.name: e.value for e in container.env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_runner_settings_errors_are_clear():
    from pipeline.errors import UserError
    from pipeline.orchestration.runners import runner_config

    with pytest.raises(UserError, match=r"DIFFUSE_RUNNER_KIND: Input should be 'local', 'docker' or 'kubernetes'"):
        runner_config({"DIFFUSE_RUNNER_KIND": "slurm"})
    with pytest.raises(UserError, match=r"DIFFUSE_RUNNER_GPUS: Input should be a valid integer"):
        runner_config({"DIFFUSE_RUNNER_GPUS": "many"})
    with pytest.raises(UserError, match=r"DIFFUSE_RUNNER_GPU: unknown variable"):  # a misspelt name is an error
        runner_config({"DIFFUSE_RUNNER_GPU": "2"})
    assert runner_config({"DIFFUSE_RUNNER_PASS_ENV": "A,B", "DIFFUSE_RUNNER_GPUS": "2"}).pass_env == ["A", "B"]
    from pipeline.config import DagConfig, from_environment

    with pytest.raises(UserError, match=r"DIFFUSE_GENERATE_SHARDS: Input should be greater than or equal to 1"):
        from_environment(DagConfig, "DIFFUSE_", {"DIFFUSE_GENERATE_SHARDS": "0"})
    assert from_environment(DagConfig, "DIFFUSE_", {"DIFFUSE_MODEL_NAME": "m", "DIFFUSE_PROMPT_STORE": "x"}) \
        .model_name == "m"  # other DIFFUSE_* variables are not the DAGs' settings
