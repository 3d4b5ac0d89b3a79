"""One small logging interface for training metrics. JSONL in the run directory by default; the MLflow
logger plugs in beside it through the same three methods."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol


class MetricsLogger(Protocol):
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, path: Path, step: int) -> None: ...


class JsonlLogger:
    """Appends one JSON line per call to run_dir/metrics.jsonl (resume keeps appending)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_params(self, params: dict) -> None:
        self._write({"time": time.time(), "params": params})

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint: they are about to be run again."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"time": time.time(), "step": step, **metrics})

    def log_image(self, path: Path, step: int) -> None:
        self._write({"time": time.time(), "step": step, "image": str(path)})


class Loggers:
    """Fan out to several loggers."""

    def __init__(self, *loggers: MetricsLogger):
        self.loggers = loggers

    def log_params(self, params: dict) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_image(self, path: Path, step: int) -> None:
        for lg in self.loggers:
            lg.log_image(path, step)
