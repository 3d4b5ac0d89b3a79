"""DVC versioning of prepared datasets inside a workspace (the folder the DAGs work in).

The workspace is a DVC project (`dvc init`, or `--no-scm` where it is not a git repository). Its default
remote is S3 when DVC_REMOTE_URL is set (pipeline/dvc_remote.py), else a local folder WORKSPACE/dvc-remote:
the embedded default, where "pushing" copies into that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.dvc_remote import REMOTE_URL_ENV, configure_remote
from pipeline.errors import UserError

LOCAL_REMOTE = "dvc-remote"


def ensure_dvc_project(workspace: Path) -> None:
    """Initialise DVC in the workspace (once) and point its default remote at S3 or the local folder."""
    from dvc.config import Config
    from dvc.repo import Repo

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
    from dvc.repo import Repo

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
    from dvc.repo import Repo

    workspace, dataset = Path(workspace), Path(dataset)
    target = Path(f"{dataset.resolve()}.dvc")
    if not target.is_file():
        raise UserError(f"{target} not found: the dataset was never versioned; run the "
                        "dataset_update DAG (or `dvc add` + `dvc push`) first")
    with Repo(str(workspace)) as repo:
        repo.pull([str(target)])
    return dvc_md5(dataset)


def dvc_md5(dataset: Path) -> str:
    import yaml

    meta = yaml.safe_load((Path(f"{dataset.resolve()}.dvc")).read_text())
    return meta["outs"][0]["md5"]


def dataset_version(dataset: Path) -> str:
    return json.loads((Path(dataset) / "dataset.json").read_text())["version"]
