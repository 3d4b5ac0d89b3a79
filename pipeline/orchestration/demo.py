"""`make demo`: the whole loop on the embedded default, through the real Airflow DAGs.

A workspace folder (.demo/) holds everything: Airflow home (SQLite), the MLflow store (SQLite + local
artifacts), the prompt store (SQLite), the DVC project with a local remote, data, runs and generated images.
`dag.test()` runs one DAG in-process and does not trigger Asset-scheduled DAGs, so the demo runs
dataset_update -> retrain -> batch_generate in order, each with the versions the previous one emitted.

The terminal shows one line per task (its state and seconds), the training's progress bar and a summary; the full
output of every DAG (Airflow's task logs, the training subprocess) goes to WORKSPACE/logs/DAG_ID.log.

    python -m pipeline.orchestration.demo [--workspace .demo] [--config configs/shapes.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import GenerationConfig, load_config
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


@contextlib.contextmanager
def output_to(log: Path):
    """Everything this process and its children write to stdout and stderr goes to `log` (appended)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def run_dag(dag, lines, logs: Path, what: str):
    """dag.test() with its output in logs/DAG_ID.log; the run, or SystemExit naming what failed."""
    print(f"{dag.dag_id}: {what}", file=lines.out, flush=True)
    log = logs / f"{dag.dag_id}.log"
    with output_to(log):
        dr = dag.test()
    for ti in sorted(dr.get_task_instances(), key=lambda t: (t.start_date is None, t.start_date or 0)):
        if (ti.dag_id, ti.task_id, ti.map_index) not in lines.reported:  # skipped, or never ran
            lines.line(ti, str(ti.state))
    if str(dr.state) != "success":
        raise SystemExit(f"{dag.dag_id} did not succeed; its log: {log}")
    return dr


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
    out = open(os.dup(1), "w", buffering=1)  # the terminal, while the DAGs' output goes to the log files  # noqa: SIM115

    if not (ws / "data" / "shapes" / "metadata.jsonl").is_file():
        shapes.make_dataset(ws / "data" / "shapes", args.images, resolution=32, seed=0)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)

    store = open_store(os.environ["DIFFUSE_PROMPT_STORE"])
    known = {p.text for p in store.prompts()}
    gc = GenerationConfig(num_images=4)
    store.add([parse_prompt({"text": t}, gc) for t in DEMO_PROMPTS if t not in known], check=gc)
    store.close()

    sys.path.insert(0, str(ROOT / "dags"))
    logs = ws / "logs"
    with output_to(logs / "setup.log"):  # what the libraries log as they load
        # imported only now: Airflow, the DAG files and pipeline.orchestration read the environment set above
        from airflow.sdk.listener import get_listener_manager
        from batch_generate import batch_generate_dag
        from dataset_update import dataset_update_dag
        from retrain import retrain_dag

        from pipeline.orchestration.retrain_tasks import retrain_run_dir
        from pipeline.orchestration.task_lines import TaskLines

    lines = TaskLines(out, load_config(config).train.max_steps, retrain_run_dir)
    get_listener_manager().add_listener(lines)
    print(f"workspace {ws}; the DAGs' logs: {logs}/", file=out)
    dr = run_dag(dataset_update_dag, lines, logs, "ingest -> validate -> DVC")
    dataset = _xcom(dr, "version")
    dr = run_dag(retrain_dag, lines, logs, "pull -> gate -> train -> evaluate -> register -> promote")
    published = any(t.task_id == "publish" and str(t.state) == "success" for t in dr.get_task_instances())
    decision, evaluation = _xcom(dr, "promote"), _xcom(dr, "evaluate")
    generated = None
    if decision["champion"] is not None:
        dr = run_dag(batch_generate_dag, lines, logs, "champion -> pending prompts -> shards -> generate -> gallery")
        generated = _xcom(dr, "collect")

    metrics = evaluation["metrics"]
    summary = {
        "dataset": {"path": dataset["dataset"], "version": dataset["version"][:16], "dvc_md5": dataset["dvc_md5"]},
        "model": {"name": decision["name"], "challenger": decision["challenger"], "decision": decision["decision"],
                  "champion": decision["champion"], "published": published, "reasons": decision["reasons"]},
        "adherence": {k: v for k, v in metrics.items() if "adherence" in k}, "denoise_mse": metrics.get("denoise_mse"),
        "images": generated and generated["images"], "gallery": generated and generated.get("gallery"),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    (ws / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    names = {"adherence": "colour+shape", "seen": "colour+shape of seen pairs",
             "held_out": "colour+shape of held-out pairs"}
    adherence = [f"{names.get(k, k)} {100 * v:.0f} %" for k, v in
                 ((k.removeprefix("adherence_"), v) for k, v in summary["adherence"].items())]
    print(f"\ndataset {summary['dataset']['version']} (DVC {dataset['dvc_md5'][:12]}); model {decision['name']} "
          f"v{decision['challenger']}: {decision['decision']}, champion v{decision['champion']}", file=out)
    print("adherence: " + ", ".join(adherence), file=out)
    print(f"images: {summary['images']}, gallery: {summary['gallery']}", file=out)
    print(f"{summary['minutes']} min; summary {ws / 'demo_summary.json'}; look at it all: `make ui` (Airflow "
          "http://127.0.0.1:8080, MLflow http://127.0.0.1:5000)", file=out)


if __name__ == "__main__":
    main()
