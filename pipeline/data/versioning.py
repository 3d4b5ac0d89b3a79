"""DVC versioning of prepared datasets (needs the `data` extra: dvc[s3]).

A workspace (the folder the DAGs work in) is a DVC project (`dvc init`, or `--no-scm` where it is not a git
repository). Its default remote is S3 when DVC_REMOTE_URL is set, else a local folder WORKSPACE/dvc-remote: the
embedded default, where "pushing" copies into that folder.

`diffuse data remote` writes the remote URL (DVC_REMOTE_URL, e.g. s3://bucket/prefix) and the endpoint of a
non-AWS server (AWS_ENDPOINT_URL) into .dvc/config.local, which DVC keeps out of git (.dvc/.gitignore).
Credentials are never written anywhere: dvc-s3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile,
or an instance role) from the environment at push/pull time, as pipeline/storage.py does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from dvc.config import Config, ConfigError
from dvc.repo import Repo

from pipeline.errors import UserError

REMOTE_URL_ENV = "DVC_REMOTE_URL"
DEFAULT_REMOTE = "storage"


def configure_remote(repo: str | Path = ".", url: str | None = None, endpoint: str | None = None,
                     name: str = DEFAULT_REMOTE) -> dict:
    """Make `name` the default DVC remote of `repo` in .dvc/config.local; return what was written.

    url: default $DVC_REMOTE_URL; endpoint: default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL (none: AWS)."""
    dvc_dir = Path(repo) / ".dvc"
    if not dvc_dir.is_dir():
        raise UserError(f"{Path(repo).resolve()} is not a DVC project (no .dvc/); run `dvc init` in the "
                        "git repository first")
    url = url or os.environ.get(REMOTE_URL_ENV)
    if not url:
        raise UserError(f"no remote URL: set {REMOTE_URL_ENV}=s3://BUCKET/PREFIX or pass --url")
    if not url.startswith("s3://") or not url[len("s3://"):].split("/")[0]:
        raise UserError(f"remote URL {url!r} is not an S3 URL (s3://BUCKET/PREFIX)")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise UserError(f"endpoint {endpoint!r} must start with http:// or https://")
    remote = {"url": url} | ({"endpointurl": endpoint} if endpoint else {})
    try:
        config = Config(dvc_dir=str(dvc_dir))
        with config.edit("local") as conf:  # DVC's own schema validates what we write
            conf.setdefault("remote", {})[name] = remote
            conf.setdefault("core", {})["remote"] = name
    except ConfigError as e:
        raise UserError(f"DVC config: {e}") from None
    return {"name": name, **remote, "config": str(dvc_dir / "config.local")}


def credentials_hint() -> str | None:
    """A note when no S3 credentials are visible in the environment (a profile or role may still supply them)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return None
    if os.environ.get("AWS_PROFILE"):
        return None
    return ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set: `dvc push` / `dvc pull` will need them "
            "(or AWS_PROFILE, or an instance role) in their environment")


LOCAL_REMOTE = "dvc-remote"


def ensure_dvc_project(workspace: Path) -> None:
    """Initialise DVC in the workspace (once) and point its default remote at S3 or the local folder."""
    workspace = Path(workspace)
    if not (workspace / ".dvc").is_dir():
        Repo.init(str(workspace), no_scm=not (workspace / ".git").exists())
    if os.environ.get(REMOTE_URL_ENV):
        configure_remote(workspace)
        return
    local = workspace / LOCAL_REMOTE
    local.mkdir(exist_ok=True)
    with Config(dvc_dir=str(workspace / ".dvc")).edit("local") as conf:
        if not conf.get("core", {}).get("remote"):
            conf.setdefault("remote", {})["local"] = {"url": str(local.resolve())}
            conf.setdefault("core", {})["remote"] = "local"


def add_and_push(workspace: Path, dataset: Path) -> str:
    """`dvc add` the prepared dataset folder and push it to the remote; returns the folder's DVC md5."""
    workspace, dataset = Path(workspace), Path(dataset)
    ensure_dvc_project(workspace)
    target = dataset.resolve()
    target.relative_to(workspace.resolve())  # DVC versions only what is inside its project
    with Repo(str(workspace)) as repo:
        repo.add([str(target)])
        repo.push([f"{target}.dvc"])
    return dvc_md5(dataset)


def pull(workspace: Path, dataset: Path) -> str:
    """Fetch the version recorded in DATASET.dvc from the remote into the workspace (a no-op when present)."""
    workspace, dataset = Path(workspace), Path(dataset)
    target = Path(f"{dataset.resolve()}.dvc")
    if not target.is_file():
        raise UserError(f"{target} not found: the dataset was never versioned; run the "
                        "dataset_update DAG (or `dvc add` + `dvc push`) first")
    with Repo(str(workspace)) as repo:
        repo.pull([str(target)])
    return dvc_md5(dataset)


def dvc_md5(dataset: Path) -> str:
    meta = yaml.safe_load((Path(f"{dataset.resolve()}.dvc")).read_text())
    return meta["outs"][0]["md5"]


def dataset_version(dataset: Path) -> str:
    return json.loads((Path(dataset) / "dataset.json").read_text())["version"]
