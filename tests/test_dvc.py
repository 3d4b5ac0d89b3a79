"""DVC on S3: the repo's dvc.yaml runs the whole chain (shapes -> ingest -> validate -> train -> evaluate) in a
temporary git + DVC project with tiny params; a second `dvc repro` does nothing; `dvc push` to the real local
S3 server (rclone), delete outputs and cache, `dvc pull`: every output comes back byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, tiny_config
from s3_server import s3_env
from typer.testing import CliRunner

BIN = Path(sys.executable).parent
OUTPUTS = ("data/shapes", "data/prepared", "data/big", "runs")


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def find_key(node, suffix: str):
    """(key, value) pairs anywhere in nested dicts whose key ends with suffix."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and k.endswith(suffix):
                yield k, v
            yield from find_key(v, suffix)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under the DVC outputs."""
    out = {}
    for top in filter(lambda t: (root / t).exists(), OUTPUTS):
        for f in sorted((root / top).rglob("*")):
            if f.is_file() and f.name != ".gitignore":
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3_server):
    """A fresh git + DVC project holding the repo's dvc.yaml, tiny params and a tiny training config, with the
    S3 remote configured by `diffuse data remote` from the environment; `dvc repro` already run once."""
    tmp = tmp_path_factory.mktemp("dvcproj")
    proj = tmp / "proj"
    proj.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSE_DATA_ROOT"}
    env |= s3_env(s3_server) | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # stage commands call `diffuse` from this venv
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "DVC_REMOTE_URL": f"s3://{s3_server.bucket}/dvc-test",
        "OMP_NUM_THREADS": "1",
    }
    sh(["git", "init", "-q"], proj, env)
    sh([str(BIN / "dvc"), "init", "-q"], proj, env)
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    (proj / "params.yaml").write_text(yaml.safe_dump({
        "shapes": {"out": "data/shapes", "num": 48, "resolution": 16, "seed": 0},
        "data": {"source": "data/shapes", "name": "tiny", "resolution": 16},
        "train": {"config": "configs/tiny.yaml", "run_dir": "runs/tiny"},
        "evaluate": {"per_pair": 1, "steps": 2, "out": "runs/tiny-adherence.json"},
    }))
    cfg = tiny_config(tmp, Path("data/shapes"), ingest={"workers": 1, "near_duplicates": "flag"},
                      validation={"max_near_duplicate_rate": 1.0}, tracking={"enabled": False},
                      train={"max_steps": 6, "checkpoint_every": 6})
    cfg["context"]["cache_dir"] = ".cache/embeddings"
    (proj / "configs").mkdir()
    (proj / "configs" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    sh([str(BIN / "diffuse"), "data", "remote"], proj, env)
    repro = sh([str(BIN / "dvc"), "repro"], proj, env)
    return proj, env, repro


def test_repro_runs_the_chain(project):
    proj, env, repro = project
    for stage in ("shapes", "ingest", "validate", "train", "evaluate"):
        assert f"Running stage '{stage}'" in repro.stdout, repro.stdout
    assert (proj / "data/prepared/tiny/manifest.parquet").is_file()
    assert list((proj / "data/prepared/tiny/shards").glob("shard-*.npy"))
    assert (proj / "data/prepared/tiny.validation/docs/index.html").is_file()
    assert (proj / "runs/tiny/model").is_dir()
    assert (proj / "runs/tiny-adherence.json").is_file()
    metrics = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], proj, env).stdout)
    found = dict(find_key(metrics, "validation.json"))
    assert found and next(iter(found.values()))["data"]["success"] is True, metrics
    # with the repo's .gitignore, outputs stay out of git while DVC's own files (dvc.lock, pointer .dvc files
    # under data/, the .gitignore files DVC writes) can be committed
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=proj).returncode == 0

    assert ignored("data/prepared/tiny/manifest.parquet") and ignored("data/shapes/metadata.jsonl")
    assert ignored("runs/tiny/model")
    assert not ignored("dvc.lock") and not ignored("data/raw.dvc") and not ignored("data/prepared/.gitignore")


def test_second_repro_does_nothing(project):
    proj, env, _ = project
    lock = (proj / "dvc.lock").read_bytes()
    again = sh([str(BIN / "dvc"), "repro"], proj, env)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout.lower()
    assert (proj / "dvc.lock").read_bytes() == lock


def test_latent_chain_trains_a_vae_fills_the_cache_and_trains_on_it(project):
    """latent/dvc.yaml after the main chain's prepared dataset: the VAE and the latent cache are pipeline outputs."""
    proj, env, _ = project
    shutil.copytree(ROOT / "latent", proj / "latent", ignore=shutil.ignore_patterns("params.yaml"))
    (proj / "latent" / "params.yaml").write_text(yaml.safe_dump({
        "config": "configs/tiny_latent.yaml", "data": {"name": "tiny", "resolution": 16},
        "vae": {"run_dir": "runs/tiny-vae"}, "model": {"run_dir": "runs/tiny-latent"}}))
    cfg = yaml.safe_load((proj / "configs" / "tiny.yaml").read_text())
    cfg["vae"] = {"block_out_channels": [8, 16], "norm_num_groups": 4, "batch_size": 8, "max_steps": 2,
                  "warmup_steps": 1, "sample_every": 0, "num_threads": 1}
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "patch_size"} | {"block_out_channels": [16, 16]}
    (proj / "configs" / "tiny_latent.yaml").write_text(yaml.safe_dump(cfg))
    repro = sh([str(BIN / "dvc"), "repro", "latent/dvc.yaml"], proj, env)
    for stage in ("train_vae", "encode", "train"):
        assert f"Running stage 'latent/dvc.yaml:{stage}'" in repro.stdout, repro.stdout
    assert "Running stage 'ingest'" not in repro.stdout  # the prepared dataset was up to date
    assert (proj / "runs/tiny-vae/vae/config.json").is_file()
    assert list((proj / "data/prepared/tiny.latents").glob("*/part-*.keys.npy"))
    spec = json.loads((proj / "runs/tiny-latent/model/conditioning.json").read_text())
    assert spec["vae"]["source"] == str((proj / "runs/tiny-vae/vae").resolve())
    again = sh([str(BIN / "dvc"), "repro", "latent/dvc.yaml"], proj, env)
    assert "Running stage" not in again.stdout


def test_remote_config_stays_local_and_holds_no_credentials(project, s3_server):
    proj, _, _ = project
    local = (proj / ".dvc/config.local").read_text()
    assert f"s3://{s3_server.bucket}/dvc-test" in local and s3_server.endpoint in local
    for f in (proj / ".dvc/config", proj / ".dvc/config.local"):
        assert s3_server.key not in f.read_text() and s3_server.secret not in f.read_text()
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=proj).returncode == 0


def test_push_delete_pull_is_byte_identical(project, s3_server):
    import boto3

    proj, env, _ = project
    # plus one shard of a realistic size: over s3fs's 50 MB chunk it is uploaded in parts and downloaded in
    # concurrent ranges (the path that needs AWS_RESPONSE_CHECKSUM_VALIDATION=when_required with rclone)
    big = proj / "data" / "big"
    big.mkdir()
    np.save(big / "shard-00000.npy", np.random.default_rng(0).integers(0, 256, (51 * 2**20,), dtype=np.uint8))
    sh([str(BIN / "dvc"), "add", "data/big"], proj, env)
    assert subprocess.run(["git", "check-ignore", "-q", "data/big.dvc"], cwd=proj).returncode == 1
    before = tree_digest(proj)
    assert any(k.endswith(".npy") for k in before) and any(k.endswith("manifest.parquet") for k in before)
    assert "data/big/shard-00000.npy" in before
    sh([str(BIN / "dvc"), "push"], proj, env)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.key,
                      aws_secret_access_key=s3_server.secret, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="dvc-test/")["Contents"]]
    assert len(keys) >= len(before)  # every file's object (+ .dir listings) is on the server

    for top in OUTPUTS:
        shutil.rmtree(proj / top)
    shutil.rmtree(proj / ".dvc/cache")
    shutil.rmtree(Path(env["DVC_SITE_CACHE_DIR"]), ignore_errors=True)
    sh([str(BIN / "dvc"), "pull"], proj, env)
    assert tree_digest(proj) == before
    status = sh([str(BIN / "dvc"), "status"], proj, env)
    assert "up to date" in status.stdout.lower(), status.stdout


def test_remote_command_needs_a_url(tmp_path, monkeypatch):
    from pipeline.cli import app

    (tmp_path / ".dvc").mkdir()
    monkeypatch.delenv("DVC_REMOTE_URL", raising=False)
    res = CliRunner().invoke(app, ["data", "remote", "--repo", str(tmp_path)])
    assert res.exit_code == 2 and "DVC_REMOTE_URL" in res.output
    res = CliRunner().invoke(app, ["data", "remote", "--repo", str(tmp_path), "--url", "http://example/x"])
    assert res.exit_code == 2 and "not an S3 URL" in res.output
    res = CliRunner().invoke(app, ["data", "remote", "--repo", str(tmp_path / "nope"), "--url", "s3://b/p"])
    assert res.exit_code == 2 and "dvc init" in res.output
