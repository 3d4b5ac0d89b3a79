"""`diffuse train` logs to a real MLflow store (sqlite backend + local artifacts); resume continues the run;
an unreachable server is a clear error; `--log-only` logs a finished local run later."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import torch
from conftest import invoke

from tests.mlflow_support import mlflow_store, run_config, train_run, write_yaml

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default stores and caches (./mlflow.db, ./mlartifacts, .cache/models) land here



def _client(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")


def test_train_vae_logs_metrics_reconstruction_grids_and_the_vae(tmp_path, shapes_data):
    store = tmp_path / "store"
    store.mkdir()
    cfg = run_config(tmp_path, shapes_data, store, vae={"block_out_channels": [8, 16], "norm_num_groups": 4,
                                                        "max_steps": 4, "batch_size": 8, "log_every": 2,
                                                        "sample_every": 2, "checkpoint_every": 4})
    result = invoke("train-vae", "--config", str(write_yaml(tmp_path / "c.yaml", cfg)))
    assert result.exit_code == 0, result.output
    assert "PSNR" in result.output and "eval split" in result.output
    client = _client(tmp_path)
    run = client.get_run(json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["vae.latent_channels"] == "4"
    assert {"loss", "reconstruction", "kl", "eval/psnr", "eval/ssim"} <= set(run.data.metrics)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in grids) == [2, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "vae")} == {"vae/config.json",
                                                                              "vae/diffusion_pytorch_model.safetensors"}


def test_train_logs_everything_and_resume_continues_the_same_run(tmp_path, shapes_data):
    store = tmp_path / "store"
    store.mkdir()
    cfg = run_config(tmp_path, shapes_data, store, train={"max_steps": 10, "checkpoint_every": 5},
                     tracking={"sample_every": 5})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    result = invoke("train", "--config", str(config))
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    client = _client(tmp_path)
    run = client.get_run(record["run_id"])

    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "10" and run.data.params["context.encoder"] == "minilm"
    assert set(run.data.metrics) >= {"loss", "lr", "grad_norm", "img_per_s"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10]
    from pipeline.config import Config
    from pipeline.data.loader import open_training_data

    trained_on = open_training_data(Config.model_validate(cfg).data, Config.model_validate(cfg).ingest).version
    tags = run.data.tags
    assert tags["dataset_version"] == trained_on
    assert len(tags["git_commit"]) == 40 and tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert tags["sys.cpu_count"] and tags["sys.torch"].startswith("2.")
    assert run.inputs.dataset_inputs[0].dataset.digest == trained_on[:36]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [5, 10]  # step-indexed grids
    assert (run_dir / "samples" / "step-0000005.png").is_file()
    # the model is logged as a pyfunc on the run (registration later uses it)
    logged = client.search_logged_models([run.info.experiment_id])
    assert [m.model_id for m in logged] == [record["model_id"]] and logged[0].source_run_id == run.info.run_id

    result = invoke("train", "--config", str(config), "--resume", "--set", "train.max_steps=15")
    assert result.exit_code == 0, result.output
    again = json.loads((run_dir / "mlflow_run.json").read_text())
    assert again["run_id"] == record["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15]
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # the resumed training wrote a new model: it is logged too, and registration will take it
    logged = client.search_logged_models([run.info.experiment_id])
    assert len(logged) == 2 and again["model_id"] != record["model_id"]
    assert again["model_id"] in {m.model_id for m in logged}


class _DroppingServer:
    """Accepts TCP connections and closes each at once, counting them: a tracking server that never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_unreachable_tracking_server_is_a_clear_error_after_retries(tmp_path, shapes_data):
    server = _DroppingServer()
    try:
        cfg = run_config(tmp_path, shapes_data, tracking={"enabled": True, "uri": server.url, "retries": 2,
                                                          "backoff_seconds": 0.2, "timeout_seconds": 2})
        result = invoke("train", "--config", str(write_yaml(tmp_path / "c.yaml", cfg)))
    finally:
        server.close()
    assert result.exit_code == 2
    assert f"MLflow tracking at {server.url} failed to open experiment" in result.output
    assert "after 3 tries" in result.output
    # our 3 tries are all the tries: MLflow's own retries (minutes of backoff against a dead server) are off
    assert server.connections == 3
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training, nothing half-done


def test_log_only_logs_a_finished_local_run_once(tmp_path, shapes_data):
    run_dir = train_run(tmp_path, shapes_data, max_steps=10)  # tracking off
    assert not (run_dir / "mlflow_run.json").exists()
    with mlflow_store(tmp_path):
        result = invoke("train", "--log-only", str(run_dir))
        assert result.exit_code == 0, result.output
        record = json.loads((run_dir / "mlflow_run.json").read_text())
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = client.get_run(record["run_id"])
        local_steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                       if "loss" in json.loads(x)]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == local_steps == [5, 10]
        assert run.data.params["train.max_steps"] == "10"
        assert record.get("model_id") and run.info.status == "FINISHED"
        # a second --log-only adds nothing: same run, no duplicate points, no second model
        assert invoke("train", "--log-only", str(run_dir)).exit_code == 0
        assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == record["run_id"]
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
        assert len(client.search_logged_models([run.info.experiment_id])) == 1


def test_log_only_of_a_folder_that_is_no_run(tmp_path):
    result = invoke("train", "--log-only", str(tmp_path))
    assert result.exit_code == 2 and "no config.yaml" in result.output


def test_store_failing_mid_training_turns_logging_off_and_training_finishes(tmp_path, shapes_data):
    """The real store breaks after the first metrics (its sqlite file is overwritten): the logger retries, then
    turns itself off with the reason; training, checkpoints and metrics.jsonl carry on; --log-only later works."""
    from pipeline.config import Config
    from pipeline.registry.tracking import MLflowLogger
    from pipeline.training.loop import train

    store = tmp_path / "store"
    store.mkdir()
    cfg = Config.model_validate(run_config(tmp_path, shapes_data, store, train={"max_steps": 10},
                                           tracking={"retries": 1, "backoff_seconds": 0.1}))
    logger = MLflowLogger(cfg)

    class BreakStoreAfterFirstMetrics:
        def log_params(self, params):
            logger.log_params(params)

        def log_metrics(self, metrics, step):
            logger.log_metrics(metrics, step)
            if step == 5:
                logger.client._tracking_client.store.engine.dispose()  # no pooled connection survives
                (store / "mlflow.db").write_bytes(b"this is not a database" * 512)

        def log_image(self, path, step):
            logger.log_image(path, step)

    model_dir = train(cfg, logger=BreakStoreAfterFirstMetrics(), progress=False)
    logger.finish(model_dir)
    assert logger.failed and "failed to log metrics after 2 tries" in logger.failed
    assert (model_dir / "conditioning.json").is_file() and (tmp_path / "run" / "checkpoints").is_dir()
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [5, 10]
    result = invoke("train", "--log-only", str(tmp_path / "run"))  # the store is still broken: a clear error
    assert result.exit_code == 2 and "file is not a database" in result.output
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"  # a store that works: the whole run goes there
    result = invoke("train", "--log-only", str(tmp_path / "run"), "--set", f"tracking.uri={fresh}")
    assert result.exit_code == 0, result.output
    from mlflow import MlflowClient

    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in MlflowClient(fresh).get_metric_history(run_id, "loss")] == [5, 10]
