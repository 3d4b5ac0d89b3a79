"""The record of a generation run: manifest.jsonl (one line per image), summary.json and gallery.html, written to
ARTIFACT_ROOT/runs/RUN_ID/ and logged to an MLflow run in the generation experiment.

Built from the prompt store (outputs and failures with this run id), so the shards of one run -- separate
processes, or Airflow tasks -- share one gallery. The gallery embeds a thumbnail of every image (it opens from
MLflow's artifact view or a downloaded file) and links to the full-size object.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param

from pipeline.config import GenerationConfig, TrackingConfig, load_section
from pipeline.generation.artifacts import ArtifactStore
from pipeline.generation.prompt_store import open_store
from pipeline.generation.prompt_store import store_url as default_store
from pipeline.images import thumbnail_uri
from pipeline.registry.client import TrackingUnavailable, connect, tracking_uri, with_retries
from pipeline.registry.model_uri import version_label

log = logging.getLogger(__name__)


def _manifest_row(o, p) -> dict:
    return {"run_id": o.run_id, "prompt_id": o.prompt_id, "prompt": p.text, "model_name": o.model_name,
            "model_version": o.model_version, "seed": o.seed, "image_uri": o.image_uri, "sha256": o.sha256,
            **{k: v for k, v in o.settings.items()}, "coverage": o.coverage, "coverage_score": o.coverage_score,
            "generate_seconds": o.generate_seconds, "write_seconds": o.write_seconds,
            "created_at": o.created_at.isoformat() if o.created_at else None}


def render_html(run_id: str, rows: list[dict], failures: list[dict], thumbs: dict[str, str], links: dict[str, str],
                summary: dict, px: int) -> str:
    e = html.escape

    models = sorted({f"{r['model_name']} {version_label(r['model_version'])}" for r in rows})
    cards = []
    for r in rows:
        flag = r["coverage"]
        cls = {"in_span": "ok", "outside_span": "warn"}.get(flag, "na")
        score = f" {r['coverage_score']:.2f}" if r["coverage_score"] is not None else ""
        settings = f"{r['sampler']} · {r['steps']} steps · guidance {r['guidance']} · {r['size']} px"
        if r.get("init_image_uri"):
            settings += f" · img2img from {r['init_image_uri']} (strength {r['strength']})"
        if r.get("doodle_sha256"):
            settings += f" · doodle {r['doodle_sha256'][:12]} (image guidance {r['image_guidance']})"
        neg = f"<div class=neg>not: {e(r['negative_prompt'])}</div>" if r.get("negative_prompt") else ""
        img = thumbs.get(r["image_uri"])
        img_tag = (f'<a href="{e(links[r["image_uri"]])}"><img src="{img}" width={px} height={px}></a>' if img
                   else f'<div class=missing>image unreadable: {e(r["image_uri"])}</div>')
        cards.append(f"<figure>{img_tag}<figcaption><b>#{r['prompt_id']}</b> {e(r['prompt'])}{neg}"
                     f"<div>{e(r['model_name'])} {e(version_label(r['model_version']))} · seed {r['seed']}</div>"
                     f"<div class=set>{e(settings)}</div>"
                     f"<span class='cov {cls}'>{e(flag)}{score}</span></figcaption></figure>")
    fail_rows = "".join(f"<tr><td>{f['prompt_id']}</td><td>{e(f['prompt'][:200])}</td><td>{e(f['kind'])}</td>"
                        f"<td>{e(f['reason'])}</td></tr>" for f in failures)
    fails = (f"<h2>Not generated ({len(failures)})</h2><table><tr><th>prompt</th><th>text</th><th>kind</th>"
             f"<th>reason</th></tr>{fail_rows}</table>") if failures else ""
    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;width:"
             + str(px) + "px;margin:6px;font-size:12px}img{image-rendering:pixelated;border:1px solid #ccc}"
             ".set,.neg{color:#555}.cov{padding:0 4px;border-radius:3px}.ok{background:#cfc}.warn{background:#fcc}"
             ".na{background:#eee}td,th{padding:2px 8px;text-align:left;vertical-align:top}")
    head = (f"<h1>Generation run {e(run_id)}</h1><p>{len(rows)} images · model {e(', '.join(models) or '-')} · "
            f"{summary['failed']} prompts failed · {summary['skipped']} skipped by the coverage policy</p>")
    return (f"<!doctype html><meta charset=utf-8><title>{e(run_id)}</title><style>{style}</style>{head}"
            + "".join(cards) + fails)


def write_gallery(run_id: str, *, store_url: str | None = None, artifact_root: str | None = None,
                  config: str | Path | None = None, summaries: list | None = None,
                  log_mlflow: bool = True) -> dict:
    """Manifest + summary + HTML gallery of run RUN_ID into ARTIFACT_ROOT/runs/RUN_ID/, logged to MLflow.
    `summaries`: the run's shards as generate_shard reported them (ShardSummary, or its fields as a dict the way
    an Airflow task passes them on): their timings go into the record. Optional."""
    cfg_path = Path(config) if config else None
    gc = load_section(cfg_path, "generation", GenerationConfig)
    store = open_store(default_store(gc, store_url))
    art = ArtifactStore(artifact_root or gc.artifact_root, gc.retries, gc.backoff_seconds)
    try:
        rows = [_manifest_row(o, p) for o, p in store.outputs(run_id=run_id)]
        failures = [{"prompt_id": f.prompt_id, "prompt": p.text, "kind": f.kind, "reason": f.reason,
                     "model_name": f.model_name, "model_version": f.model_version} for f, p in store.failures(run_id)]
    finally:
        store.close()
    where = f"runs/{run_id}"
    thumbs, links = {}, {}
    for r in rows:
        links[r["image_uri"]] = art.relative(where, r["image_uri"])
        try:
            thumbs[r["image_uri"]] = thumbnail_uri(art.read(r["image_uri"]), gc.thumbnail_px)
        except Exception as e:  # the gallery still lists it, and says so
            log.warning("gallery: cannot read %s (%s)", r["image_uri"], e)
    summaries = [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in summaries or []]
    seconds = sum(s.get("seconds", 0) for s in summaries)
    summary = {"run_id": run_id, "images": len(rows), "prompts": len({r["prompt_id"] for r in rows}),
               "failed": sum(f["kind"] != "skipped" for f in failures),
               "skipped": sum(f["kind"] == "skipped" for f in failures),
               "outside_span": sum(r["coverage"] == "outside_span" for r in rows),
               "models": sorted({f"{r['model_name']}/{r['model_version']}" for r in rows}),
               "failures": failures, "shards": summaries}
    if seconds:
        summary["images_per_second"] = round(sum(s.get("images", 0) for s in summaries) / seconds, 3)
    files = {"manifest.jsonl": "".join(json.dumps(r, default=str) + "\n" for r in rows),
             "summary.json": json.dumps(summary, indent=2, default=str),
             "gallery.html": render_html(run_id, rows, failures, thumbs, links, summary, gc.thumbnail_px)}
    uris = {name: art.put(f"{where}/{name}", text.encode()) for name, text in files.items()}
    result = {"run_id": run_id, "images": len(rows), "failed": summary["failed"], "skipped": summary["skipped"],
              "manifest": uris["manifest.jsonl"], "gallery": uris["gallery.html"], "summary": uris["summary.json"],
              "mlflow_run_id": None, "mlflow": "not logged"}
    if log_mlflow:
        result.update(_log_to_mlflow(run_id, files, summary, rows, cfg_path, gc))
    return result


def _log_to_mlflow(run_id: str, files: dict[str, str], summary: dict, rows: list[dict], cfg_path: Path | None,
                   gc: GenerationConfig) -> dict:
    """One MLflow run per generation run (found again by its tag, so writing the gallery twice updates it)."""
    tc = load_section(cfg_path, "tracking", TrackingConfig)
    if not tc.enabled:
        return {"mlflow": "skipped: tracking.enabled is false"}
    tc = tc.model_copy(update={"experiment": gc.experiment})
    try:
        client, exp_id = connect(tc)

        def log_all() -> str:
            found = client.search_runs([exp_id], f"tags.generation_run_id = '{run_id}'", max_results=1)
            if found:
                mlflow_run = found[0].info.run_id
            else:
                tags = {"generation_run_id": run_id, "models": ", ".join(summary["models"])[:5000]}
                mlflow_run = client.create_run(exp_id, tags=tags, run_name=run_id).info.run_id

            now = int(time.time() * 1000)
            metrics = {k: float(summary[k]) for k in ("images", "prompts", "failed", "skipped", "outside_span")}
            if "images_per_second" in summary:
                metrics["images_per_second"] = float(summary["images_per_second"])
            params = {}
            if rows:
                params = {"model_name": rows[0]["model_name"], "model_version": rows[0]["model_version"],
                          "model_uri": rows[0].get("model_uri", "")}
            existing = client.get_run(mlflow_run).data.params
            client.log_batch(mlflow_run, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items() if k not in existing])
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in files.items():
                    (Path(tmp) / name).write_text(text)
                    client.log_artifact(mlflow_run, str(Path(tmp) / name), "generation")
            client.set_terminated(mlflow_run, "FINISHED")
            return mlflow_run

        mlflow_run = with_retries(log_all, tc, "log the generation run")
        return {"mlflow_run_id": mlflow_run, "mlflow": f"{tracking_uri(tc)} experiment {gc.experiment!r}"}
    except TrackingUnavailable as e:
        log.warning("%s", e)
        return {"mlflow": f"failed: {e}"}
