"""The MLflow tracking store: where it is, a client for it, retries around every call to it, and the run record
a training run keeps in RUN_DIR/mlflow_run.json. Everything else in pipeline/registry/ builds on this module.

MLflow's own HTTP retries are turned down so that an unreachable server is reported after our tries (tenacity,
exponential backoff), not after minutes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from tenacity import RetryError, Retrying, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from pipeline.config import TrackingConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
T = TypeVar("T")


class TrackingUnavailable(UserError):
    """The tracking store did not answer after the configured retries."""


def tracking_uri(tc: TrackingConfig | None = None) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    if tc is not None and tc.uri:
        return tc.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def short(e: BaseException | None) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 300 else text[:300] + "..."


def with_retries(fn: Callable[[], T], tc: TrackingConfig, what: str) -> T:
    """fn() with tc.retries retries and exponential backoff; then a TrackingUnavailable naming the store.
    A UserError (bad input) is not retried."""

    def warn(state) -> None:
        log.warning("MLflow %s failed (%s); retry %d/%d in %.1f s", what, short(state.outcome.exception()),
                    state.attempt_number, tc.retries, state.next_action.sleep)

    # network errors, 5xx, a locked sqlite file: all worth another try
    attempts = Retrying(stop=stop_after_attempt(tc.retries + 1), wait=wait_exponential(multiplier=tc.backoff_seconds),
                        retry=retry_if_not_exception_type(UserError), before_sleep=warn)
    try:
        return attempts(fn)
    except RetryError as e:
        raise TrackingUnavailable(f"MLflow tracking at {tracking_uri(tc)} failed to {what} after {tc.retries + 1} "
                                  f"tries: {short(e.last_attempt.exception())}") from None


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def _artifact_location(tc: TrackingConfig, uri: str) -> str | None:
    """Configured, else for a sqlite store `mlartifacts/` beside its file (./mlartifacts for the default
    ./mlflow.db), else ./mlartifacts for another local store; a server chooses its own (None)."""
    if tc.artifact_location:
        return tc.artifact_location
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return (Path("mlartifacts").resolve()).as_uri() if _is_local(uri) else None


def connect(tc: TrackingConfig) -> tuple[MlflowClient, str]:
    """A client for the configured store and the experiment id (created if missing), checked with retries."""
    # our retries replace MLflow's (7 tries with backoff factor 2 would take minutes to report a dead server)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(tc.timeout_seconds)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact copy is noise
    uri = tracking_uri(tc)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    def experiment_id() -> str:
        exp = client.get_experiment_by_name(tc.experiment)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(tc.experiment, artifact_location=_artifact_location(tc, uri))

    return client, with_retries(experiment_id, tc, f"open experiment {tc.experiment!r}")


def read_run_file(run_dir: Path) -> dict | None:
    """RUN_DIR/mlflow_run.json: {run_id, experiment_id, tracking_uri, model_id}, or None without one."""
    f = Path(run_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{f} is corrupt; delete it to start a new MLflow run for {run_dir}") from None


def write_run_file(run_dir: Path, record: dict) -> None:
    f = Path(run_dir) / RUN_FILE
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, f)
