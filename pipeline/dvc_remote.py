"""The DVC remote on S3, configured from the environment.

`diffuse data remote` writes the remote URL (DVC_REMOTE_URL, e.g. s3://bucket/prefix) and the endpoint of a
non-AWS server (AWS_ENDPOINT_URL) into .dvc/config.local, which DVC keeps out of git (.dvc/.gitignore).
Credentials are never written anywhere: dvc-s3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile,
or an instance role) from the environment at push/pull time, like boto3 does for pipeline/s3.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError

REMOTE_URL_ENV = "DVC_REMOTE_URL"
DEFAULT_REMOTE = "storage"


def configure_remote(repo: str | Path = ".", url: str | None = None, endpoint: str | None = None,
                     name: str = DEFAULT_REMOTE) -> dict:
    """Make `name` the default DVC remote of `repo` in .dvc/config.local; return what was written.

    url: default $DVC_REMOTE_URL; endpoint: default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL (none: AWS)."""
    from dvc.config import Config, ConfigError

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
