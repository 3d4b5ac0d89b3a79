"""Resolve a model reference to a local model directory -- the one function other code calls:

    resolve_model("models:/shapes@champion") -> ResolvedModel(name, version, model_dir, run_id, uri)

Accepted: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a local model directory (or a run directory holding
`model/`). Registry versions are downloaded once into a cache (`.cache/models/<store>/<NAME>/<VERSION>`; versions
are immutable) and checked. An unknown name, alias or version is a UserError listing what exists; missing or
corrupt artifacts are a UserError at resolve time, not a traceback later.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.errors import UserError
from pipeline.registry.client import tracking_uri as default_uri

DEFAULT_CACHE = Path(".cache/models")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
REQUIRED_FILES = ("conditioning.json", "unet/config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    name: str | None  # None for a local directory
    version: str | None
    model_dir: Path  # a model directory as written by pipeline.model.folder.save_model
    run_id: str | None  # the MLflow run that produced the version
    uri: str


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, ALIAS, None); models:/NAME/VERSION -> (NAME, None, VERSION)."""
    m = _URI.match(uri.strip())
    if not m:
        raise UserError(f"not a model URI: {uri!r}; use models:/NAME@ALIAS, models:/NAME/VERSION or a model "
                        "directory")
    return m["name"], m["alias"], m["version"]


def _check_model_dir(path: Path, what: str) -> Path:
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    weights = list((path / "unet").glob("*.safetensors")) + list((path / "unet").glob("*.bin"))
    if missing or not weights:
        lacking = ", ".join(missing) or "no unet weights"
        raise UserError(f"{what}: the model artifacts are missing or incomplete ({lacking} in {path}); "
                        "re-register the model from its run")
    return path


def registry_version(client, name: str, alias: str | None, version: str | None):
    """The ModelVersion for NAME@ALIAS or NAME/VERSION, or a UserError listing what exists."""
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code) and "not found" not in str(e).lower():
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(f"no registered model named {name!r}; registered models: "
                        f"{', '.join(names) or '(none -- register one with `diffuse register`)'}") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if alias is not None:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "(no aliases)"
            raise UserError(f"model {name!r} has no alias {alias!r}; aliases: {listed}; versions: "
                            f"{', '.join(map(str, versions)) or '(none)'}")
        version = str(aliases[alias])
    if int(version) not in versions:
        raise UserError(f"model {name!r} has no version {version}; versions: "
                        f"{', '.join(map(str, versions)) or '(none)'}")
    return client.get_model_version(name, version)


def _find_model_dir(downloaded: Path) -> Path:
    """The `model_dir` artifact inside a downloaded pyfunc (its path is recorded in MLmodel)."""
    mlmodel = downloaded / "MLmodel"
    if mlmodel.is_file():
        try:
            flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
            rel = (flavor.get("artifacts") or {}).get("model_dir", {}).get("path")
            if rel:
                return downloaded / rel
        except yaml.YAMLError:
            pass
    return downloaded / "artifacts" / "model"


def resolve_model(uri: str | Path, tracking_uri: str | None = None, cache_dir: Path | None = None) -> ResolvedModel:
    """A model reference -> (name, version, local model dir, run id). Downloads a registry version once."""
    s = str(uri)
    if not s.startswith("models:/"):
        path = Path(s)
        if (path / "model" / "conditioning.json").is_file():  # a run directory
            path = path / "model"
        if not path.is_dir():
            raise UserError(f"model not found: {s} (a model directory, a run directory, or models:/NAME@ALIAS)")
        return ResolvedModel(None, None, _check_model_dir(path, s), None, s)

    name, alias, version = parse_model_uri(s)
    store = tracking_uri or default_uri()
    client = MlflowClient(store)
    mv = registry_version(client, name, alias, version)
    version = str(mv.version)
    what = f"models:/{name}/{version}"
    root = Path(cache_dir or DEFAULT_CACHE) / hashlib.sha256(store.encode()).hexdigest()[:12] / name / version
    if not (root / ".complete").is_file():
        tmp = root.with_name(f"{version}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=what, dst_path=str(tmp), tracking_uri=store)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{what} ({s}): its artifacts could not be downloaded ({type(e).__name__}: "
                            f"{str(e)[:300]}); they are missing from the artifact store") from None
        _check_model_dir(_find_model_dir(tmp), f"{what} ({s})")
        (tmp / ".complete").write_text(mv.source or "")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    model_dir = _check_model_dir(_find_model_dir(root), f"{what} ({s})")
    return ResolvedModel(name, version, model_dir, mv.run_id, s)


def version_label(version: str) -> str:
    """'3' -> 'v3' (a registry version); a local model's 'sha-...' stays as it is."""
    return f"v{version}" if str(version).isdigit() else str(version)
