"""End to end against a real `mlflow server` on 127.0.0.1 whose artifacts go to the local S3 server: train with
tracking, register, promote, then `mlflow models serve -m models:/NAME@champion` answers with PNGs."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import invoke
from PIL import Image

from tests.mlflow_support import EVALUATION, env_with_venv_path, free_port, run_config, write_yaml
from tests.s3_server import s3_env

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default stores and caches (./mlflow.db, ./mlartifacts, .cache/models) land here
MLFLOW = [sys.executable, "-m", "mlflow"]



def _start(cmd: list[str], env: dict, log: Path, url: str, timeout: float = 150) -> subprocess.Popen:
    """Start a server in its own process group (it forks workers) and wait until `url` answers."""
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group started above: the server and its workers
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, **s3_env(s3_server), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = _start([*MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--artifacts-destination", f"s3://{s3_server.bucket}/mlflow", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1"], env, root / "server.log",
                  f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def test_train_register_promote_and_serve_through_mlflow_server_and_s3(mlflow_server, s3_server, tmp_path,
                                                                       shapes_data, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # the client needs no S3 credentials: the server proxies artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = run_config(tmp_path, shapes_data, train={"max_steps": 10}, evaluation=EVALUATION,
                     tracking={"enabled": True, "experiment": "e2e", "sample_every": 10, "sample_steps": 2},
                     promotion={"max_denoise_mse": 2.0, "min_adherence": None})
    config = write_yaml(tmp_path / "c.yaml", cfg)
    result = invoke("train", "--config", str(config))
    assert result.exit_code == 0, result.output
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]

    # run artifacts (config, sample grids, the pyfunc) landed in the S3 bucket, under the server's destination
    in_bucket = [p.relative_to(s3_server.root) for p in (s3_server.root / s3_server.bucket / "mlflow").rglob("*")
                 if p.is_file()]
    names = {p.name for p in in_bucket}
    assert "config.yaml" in names and "MLmodel" in names and "diffusion_pytorch_model.safetensors" in names
    assert any(run_id in str(p) and p.suffix == ".png" for p in in_bucket)

    assert invoke("register", str(tmp_path / "run"), "--name", "e2e", "--config", str(config)).exit_code == 0
    promoted = invoke("promote", "e2e", "--config", str(config))
    assert promoted.exit_code == 0 and "promoted" in promoted.output, promoted.output

    port = free_port()
    env = {**env_with_venv_path(), "MLFLOW_TRACKING_URI": mlflow_server}
    serve = _start([*MLFLOW, "models", "serve", "-m", "models:/e2e@champion", "--env-manager", "local",
                    "-h", "127.0.0.1", "-p", str(port)], env, tmp_path / "serve.log", f"http://127.0.0.1:{port}/ping")
    try:
        body = {"dataframe_split": {"columns": ["prompt", "seed", "steps"],
                                    "data": [["a large red circle in the center on a white background", 0, 4],
                                             ["a small blue square in the top left corner on a black background",
                                              1, 4]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            predictions = json.loads(r.read())["predictions"]
    finally:
        _stop(serve)
    assert len(predictions) == 2
    for p in predictions:
        assert p["error"] == ""
        with Image.open(io.BytesIO(base64.b64decode(p["image"]))) as im:
            assert im.format == "PNG" and im.size == (16, 16)
