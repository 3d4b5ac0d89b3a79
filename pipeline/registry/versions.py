"""The MLflow model registry: register versions with their evaluation and a model card, and move the `champion`
alias through a promotion gate (or back, on rollback).

    register(run_dir, name, tc, ec) -> Registration
    promote(name, tc, ec, pc, force=False) -> Promotion
    rollback(name, tc, to=None) -> Rollback

Aliases: `challenger` = the latest registered version; `champion` = the one that serves. Every decision and its
reasons are tags on the version (promotion.*, rollback.*); the registered model's `champion_history` tag lists
the champions in order, which rollback walks back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import mlflow
from mlflow.entities import Metric, RunTag

from pipeline.config import EvaluationConfig, PromotionConfig, TrackingConfig
from pipeline.errors import UserError
from pipeline.evaluation.protocol import HIGHER_IS_BETTER, evaluate, load_eval_data, model_data_settings, public_report
from pipeline.registry.client import connect, read_run_file, tracking_uri, with_retries
from pipeline.registry.model_card import inline_grid, model_card
from pipeline.registry.model_uri import registry_version, resolve_model
from pipeline.registry.tracking import log_only

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    created: bool  # False: the run was registered before, as this version
    run_id: str
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed


@dataclass(frozen=True)
class Promotion:
    name: str
    decision: Literal["promoted", "rejected", "forced", "unchanged"]
    version: str  # the challenger
    champion_before: str | None
    champion_after: str | None
    reasons: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # challenger / champion -> metrics


@dataclass(frozen=True)
class Rollback:
    name: str
    from_version: str
    to_version: str
CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion_history"
# ------------------------------------------------------------------ register


def register(run_dir: Path, name: str, tc: TrackingConfig, ec: EvaluationConfig,
             report: dict | None = None) -> Registration:
    """Register RUN_DIR's model as a new version of NAME (alias challenger), evaluated under the protocol `ec`
    (or with `report`, the result of evaluate(RUN_DIR/model, ec) already computed, e.g. by the DAG's evaluate
    task). A run that already has a version of NAME is not registered again."""
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "conditioning.json").is_file():
        raise UserError(f"{run_dir} has no trained model (expected {run_dir / 'model'}); train it first")
    client, _ = connect(tc)
    record = read_run_file(run_dir)
    if not record or record.get("tracking_uri") != tracking_uri(tc) or not record.get("model_id"):
        log.info("logging %s to MLflow first", run_dir)
        log_only(run_dir, tc)
        record = read_run_file(run_dir)
    run_id, model_id = record["run_id"], record["model_id"]

    existing = with_retries(lambda: client.search_model_versions(f"name='{name}' and run_id='{run_id}'"), tc,
                            "search model versions")
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        return Registration(name, str(mv.version), False, run_id,
                            {k.removeprefix("eval."): v for k, v in mv.tags.items() if k.startswith("eval.")})

    report = report or evaluate(run_dir / "model", ec)
    log_evaluation(client, run_id, report)
    run = client.get_run(run_id)
    tags = {k: run.data.tags[k] for k in ("dataset_version", "dataset_kind", "dataset_path", "dataset_dvc_md5",
                                          "git_commit", "git_dirty") if k in run.data.tags}
    tags |= {f"eval.{k}": str(v) for k, v in report["metrics"].items()}
    tags |= {f"eval.skipped.{k}": v for k, v in report["skipped"].items()}
    tags |= {"eval.protocol_id": report["protocol_id"], "run_dir": str(run_dir.resolve())}

    mv = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    card = model_card(name, str(mv.version), run_id, run.data.tags, report)
    # the artifact copy shows the grid inline; the version description (kept short) names the artifact
    client.log_text(run_id, card + inline_grid(report), f"model_card/{name}-v{mv.version}.md")
    client.update_model_version(name, mv.version, description=card)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return Registration(name, str(mv.version), True, run_id, report["metrics"], report["skipped"])


def log_evaluation(client, run_id: str, report: dict) -> None:
    """Metrics as eval/<name>, skipped metrics as tags with their reason, the JSON report and sample grid as
    artifacts under evaluation/<protocol id>/."""
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval/{k}", float(v), now, 0) for k, v in report["metrics"].items()]
    tags = [RunTag(f"eval.skipped.{k}", v) for k, v in report["skipped"].items()]
    tags.append(RunTag("eval.protocol_id", report["protocol_id"]))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    where = f"evaluation/{report['protocol_id']}"
    client.log_dict(run_id, public_report(report), f"{where}/report.json")
    if "sample_grid" in report["details"]:
        client.log_image(run_id, report["details"]["sample_grid"], artifact_file=f"{where}/grid.png")


# ------------------------------------------------------------------ promotion gate


def gate(challenger: dict, champion: dict | None, pc: PromotionConfig) -> tuple[bool, list[str]]:
    """(passed, reasons): absolute bars on the challenger, then margins over the champion. A metric that was
    skipped cannot be checked; that is said in the reasons and does not block."""
    m, skipped = challenger["metrics"], challenger["skipped"]
    ok, reasons = True, []
    bars = [("denoise_mse", pc.max_denoise_mse), ("adherence", pc.min_adherence), ("copy_rate", pc.max_copy_rate),
            ("fid", pc.max_fid), ("kid", pc.max_kid), ("clip_score", pc.min_clip_score)]
    for metric, bar in bars:
        if bar is None:
            continue
        higher = HIGHER_IS_BETTER[metric]
        if metric not in m:
            reasons.append(f"bar on {metric} not checked ({skipped.get(metric, 'not computed')})")
            continue
        passed = m[metric] >= bar if higher else m[metric] <= bar
        ok &= passed
        reasons.append(f"{metric} {m[metric]:.4f} {'>=' if higher else '<='} bar {bar}: "
                       f"{'pass' if passed else 'FAIL'}")
    if champion is None:
        reasons.append("no champion yet: margins not applied")
        return ok, reasons
    cm = champion["metrics"]
    for metric, margin in pc.margins.items():
        if metric not in m or metric not in cm:
            reasons.append(f"margin on {metric} not checked (not computed for "
                           f"{'the challenger' if metric not in m else 'the champion'})")
            continue
        higher = HIGHER_IS_BETTER[metric]
        need = cm[metric] + margin if higher else cm[metric] - margin
        passed = m[metric] >= need if higher else m[metric] <= need
        ok &= passed
        reasons.append(f"{metric} {m[metric]:.4f} vs champion {cm[metric]:.4f} (needs {'>=' if higher else '<='} "
                       f"{need:.4f}): {'pass' if passed else 'FAIL'}")
    return ok, reasons


def _history(rm) -> list[str]:
    try:
        return [str(v) for v in json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def promote(name: str, tc: TrackingConfig, ec: EvaluationConfig, pc: PromotionConfig, force: bool = False,
            cache_dir: Path | None = None) -> Promotion:
    """Evaluate challenger and champion under one protocol; move `champion` only when the gate passes."""
    client, _ = connect(tc)
    store = tracking_uri(tc)
    challenger = registry_version(client, name, CHALLENGER, None)
    rm = client.get_registered_model(name)
    champion_version = (rm.aliases or {}).get(CHAMPION)
    cv = str(challenger.version)
    if champion_version is not None and str(champion_version) == cv:
        return Promotion(name, "unchanged", cv, cv, cv, [f"version {cv} is already the champion"])

    results: dict[str, dict] = {}
    if force:
        passed, reasons = True, ["manual promotion (--force): the gate was not run"]
        decision = "forced"
    else:
        ch = resolve_model(f"models:/{name}/{cv}", store, cache_dir)
        # one protocol for both: the challenger's data (or evaluation.data) read with the challenger's settings
        data_path, _, ch_train_cfg = model_data_settings(ch.model_dir)
        data_path = ec.data or data_path
        if data_path is None or not Path(data_path).exists():
            raise UserError(f"evaluation data not found: {data_path}; set evaluation.data in --config")
        protocol = ec.model_copy(update={"data": data_path})
        datasets: dict[int, object] = {}  # the same held-out items for both (per resolution)

        def run(model_dir: Path) -> dict:
            resolution = model_data_settings(model_dir)[1]
            if resolution not in datasets:
                datasets[resolution] = load_eval_data(Path(data_path), resolution, protocol, ch_train_cfg)
            return evaluate(model_dir, protocol, datasets[resolution])

        results["challenger"] = run(ch.model_dir)
        if champion_version is not None:
            cp = resolve_model(f"models:/{name}/{champion_version}", store, cache_dir)
            results["champion"] = run(cp.model_dir)
        passed, reasons = gate(results["challenger"], results.get("champion"), pc)
        decision = "promoted" if passed else "rejected"

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tags = {"promotion.decision": decision, "promotion.reasons": "\n".join(reasons)[:4900],
            "promotion.time": now, "promotion.champion_before": str(champion_version or "none")}
    if results:
        tags["promotion.protocol_id"] = results["challenger"]["protocol_id"]
        compared = {k: [v, results.get("champion", {}).get("metrics", {}).get(k)]
                    for k, v in results["challenger"]["metrics"].items() if k in HIGHER_IS_BETTER}
        tags["promotion.compared"] = json.dumps(compared)[:4900]
    for k, v in tags.items():
        client.set_model_version_tag(name, cv, k, v)
    if passed:
        client.set_registered_model_alias(name, CHAMPION, cv)
        history = _history(rm)
        if champion_version is not None and (not history or history[-1] != str(champion_version)):
            history.append(str(champion_version))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [cv]))
    client.set_registered_model_tag(name, "last_promotion", f"{now} v{cv}: {decision}")
    before = None if champion_version is None else str(champion_version)
    return Promotion(name, decision, cv, before, cv if passed else before, reasons,
                     {k: r["metrics"] for k, r in results.items()})


def rollback(name: str, tc: TrackingConfig, to: str | None = None) -> Rollback:
    """Point `champion` back at the previous champion (or at version `to`)."""
    client, _ = connect(tc)
    current = registry_version(client, name, CHAMPION, None)
    rm = client.get_registered_model(name)
    history = _history(rm)
    cur = str(current.version)
    if to is None:
        while history and history[-1] == cur:
            history.pop()
        if not history:
            raise UserError(f"model {name!r}: no earlier champion than v{cur} to roll back to; "
                            "name one with --to VERSION")
        target = history[-1]
    else:
        target = str(registry_version(client, name, None, str(to)).version)
        if target == cur:
            raise UserError(f"version {target} of {name!r} is already the champion")
        history.append(target)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, target, "rollback.restored_from", f"{now}: v{cur}")
    client.set_model_version_tag(name, cur, "rollback.rolled_back", f"{now}: champion moved to v{target}")
    client.set_registered_model_tag(name, "last_promotion", f"{now} rollback v{cur} -> v{target}")
    return Rollback(name, cur, target)
