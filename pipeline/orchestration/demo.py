"""`make demo`: the whole loop on the embedded default, through the real Airflow DAGs.

A workspace folder (.demo/) holds everything: Airflow home (SQLite), the MLflow store (SQLite + local
artifacts), the prompt store (SQLite), the DVC project with a local remote, data, runs and generated images.
`dag.test()` runs one DAG in-process and does not trigger Asset-scheduled DAGs, so the demo runs
dataset_update -> retrain -> batch_generate in order, each with the versions the previous one emitted.

    python -m pipeline.orchestration.demo [--workspace .demo] [--config configs/shapes.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import GenerationConfig
from pipeline.generation.prompt_store import open_store, parse_prompt
from pipeline.shapes import dataset as shapes

ROOT = Path(__file__).resolve().parents[2]
DEMO_PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue triangle in the top left corner on a black background",
    "a large green square on the right on a gray background",
    "a small yellow circle at the bottom on a white background",
    "a large purple triangle in the bottom right corner on a black background",
    "a red triangle in the center on a white background",  # a colour x shape pair held out of training
    "a photograph of a dog on a beach",  # outside the data's span: generated and flagged
]


def environment(workspace: Path, config: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(workspace / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "DIFFUSE_WORKSPACE": str(workspace), "DIFFUSE_CONFIG": str(config),
        "DIFFUSE_SOURCE": str(workspace / "data" / "shapes"), "DIFFUSE_MODEL_NAME": "shapes",
        "DIFFUSE_DATASET_NAME": "shapes", "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
        "DIFFUSE_PROMPT_STORE": f"sqlite:///{workspace / 'prompts.db'}", "GX_ANALYTICS_ENABLED": "false",
    }


def _check(dr, name: str) -> dict[str, str]:
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    if str(dr.state) != "success":
        failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
        raise SystemExit(f"{name} did not succeed (tasks: {failed}); see the log above and "
                         f"{os.environ['AIRFLOW_HOME']}")
    return states


def _xcom(dr, task_id: str):
    ti = next(t for t in dr.get_task_instances() if t.task_id == task_id)
    return ti.xcom_pull(task_ids=task_id)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=ROOT / ".demo")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "shapes.yaml")
    ap.add_argument("--images", type=int, default=10000, help="size of the shapes dataset")
    args = ap.parse_args(argv)
    ws, config = args.workspace.resolve(), args.config.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    os.environ.update(environment(ws, config))
    t0 = time.time()

    if not (ws / "data" / "shapes" / "metadata.jsonl").is_file():
        shapes.make_dataset(ws / "data" / "shapes", args.images, resolution=32, seed=0)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)

    store = open_store(os.environ["DIFFUSE_PROMPT_STORE"])
    known = {p.text for p in store.prompts()}
    gc = GenerationConfig(num_images=4)
    store.add([parse_prompt({"text": t}, gc) for t in DEMO_PROMPTS if t not in known], check=gc)
    store.close()

    sys.path.insert(0, str(ROOT / "dags"))
    # imported only now: the DAG files (and pipeline.orchestration.dag_common) read the environment set above
    from batch_generate import batch_generate_dag
    from dataset_update import dataset_update_dag
    from retrain import retrain_dag

    print("== dataset_update: ingest -> validate -> DVC", flush=True)
    dr = dataset_update_dag.test()
    _check(dr, "dataset_update")
    dataset = _xcom(dr, "version")
    print("== retrain: pull -> gate -> train -> evaluate -> register -> promote", flush=True)
    dr = retrain_dag.test()
    states = _check(dr, "retrain")
    decision = _xcom(dr, "promote")
    evaluation = _xcom(dr, "evaluate")
    print("== batch_generate: champion -> pending prompts -> shards -> generate -> gallery", flush=True)
    generated = None
    if decision["champion"] is not None:
        dr = batch_generate_dag.test()
        _check(dr, "batch_generate")
        generated = _xcom(dr, "collect")

    metrics = evaluation["metrics"]
    adherence = {k: v for k, v in metrics.items() if "adherence" in k}
    summary = {
        "dataset": {"path": dataset["dataset"], "version": dataset["version"][:16], "dvc_md5": dataset["dvc_md5"]},
        "model": {"name": decision["name"], "challenger": decision["challenger"], "decision": decision["decision"],
                  "champion": decision["champion"], "published": states.get("publish") == "success",
                  "reasons": decision["reasons"]},
        "adherence": adherence, "denoise_mse": metrics.get("denoise_mse"),
        "images": generated and generated["images"], "gallery": generated and generated.get("gallery"),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    (ws / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nLook at it: `make ui` (Airflow http://127.0.0.1:8080, MLflow http://127.0.0.1:5000); gallery: "
          f"{summary['gallery']}")


if __name__ == "__main__":
    main()
