"""`make demo` end to end on a tiny version of the demo config: the three DAGs in order, a readable terminal (a line
per task, the training's progress, a summary) and the DAGs' logs in files."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import ROOT


def test_demo_runs_the_three_dags_and_prints_a_line_per_task(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "shapes.yaml").read_text())
    cfg["train"] |= {"cycles": [{"steps": 10, "resolution": 16}, {"steps": 6, "lr_scale": 0.5, "batch_size": 16}],
                     "warmup_steps": 4, "checkpoint_every": 8, "log_every": 4, "num_threads": 1}
    cfg["evaluation"] = {"num_items": 8, "shapes_per_pair": 1, "steps": 2}
    cfg["promotion"] = {"max_denoise_mse": None, "min_adherence": None, "max_copy_rate": None, "margins": {}}
    cfg["tracking"]["sample_every"] = 0
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "ws"
    r = subprocess.run([sys.executable, "-m", "pipeline.orchestration.demo", "--workspace", str(ws), "--config",
                        str(config), "--images", "200"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.replace("\r", "\n").splitlines()
    tasks = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ") and not
             line.startswith("    ")}
    assert tasks == {t: "success" for t in (
        "ingest", "validate", "version", "pull", "gate", "train", "evaluate", "register", "promote",
        "champion_changed", "publish", "resolve_champion", "split", "generate[0]", "generate[1]", "collect")}, tasks
    assert any("train:" in line and "16/16" in line for line in lines)  # the progress bar reached the last step
    summary = json.loads((ws / "demo_summary.json").read_text())
    assert summary["model"]["decision"] == "promoted" and summary["images"] == 28  # 7 prompts x 4 images
    assert f"model shapes v{summary['model']['challenger']}: promoted" in r.stdout
    # Airflow's and the tasks' own output is in the log files, not on the terminal
    for dag in ("dataset_update", "retrain", "batch_generate"):
        assert "[DAG TEST]" in (ws / "logs" / f"{dag}.log").read_text()
    assert "[DAG TEST]" not in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) < 40
