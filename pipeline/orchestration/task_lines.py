"""What `make demo` shows on the terminal while the DAGs run in-process: one line per finished task (an Airflow
listener, called in the process that runs the tasks) and the training's progress bar."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from airflow.listeners import hookimpl
from tqdm.auto import tqdm


class TrainingBar:
    """A progress bar of a training run in another process, read from its metrics.jsonl (a line every
    train.log_every steps) until `stop`."""

    def __init__(self, metrics: Path, total_steps: int, out):
        self.metrics, self.total, self.out = metrics, total_steps, out
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        bar = tqdm(total=self.total, desc="    train", unit="step", file=self.out, dynamic_ncols=True, mininterval=1)
        while True:
            finished = self.done.wait(1.0)
            records = []
            if self.metrics.is_file():
                records = [json.loads(x) for x in self.metrics.read_text().splitlines() if '"loss"' in x]
            if records and records[-1]["step"] != bar.n:  # redrawn only when the run logged a new step
                bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", img_s=f"{records[-1]['img_per_s']:.0f}",
                                refresh=False)
                bar.update(records[-1]["step"] - bar.n)
            if finished:
                bar.close()
                return

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


class TaskLines:
    """An Airflow listener (it runs in the process that runs the tasks): one line per finished task on `out`, and
    the training's progress bar while the retrain DAG's `train` task runs."""

    def __init__(self, out, total_steps: int, run_dir_of):
        self.out, self.total_steps, self.run_dir_of = out, total_steps, run_dir_of
        self.started: dict[tuple, float] = {}
        self.reported: set[tuple] = set()
        self.bar: TrainingBar | None = None

    @staticmethod
    def _key(ti) -> tuple:
        return ti.dag_id, ti.task_id, ti.map_index

    def line(self, ti, state: str, seconds: float | None = None) -> None:
        name = ti.task_id + (f"[{ti.map_index}]" if ti.map_index is not None and ti.map_index >= 0 else "")
        took = f"{seconds:6.1f} s" if seconds is not None else ""
        print(f"  {name:<20} {state:<16} {took}", file=self.out, flush=True)
        self.reported.add(self._key(ti))

    def _finish(self, ti, state: str) -> None:
        if ti.task_id == "train" and self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.line(ti, state, time.monotonic() - self.started.get(self._key(ti), time.monotonic()))

    @hookimpl
    def on_task_instance_running(self, previous_state, task_instance):
        self.started[self._key(task_instance)] = time.monotonic()
        if task_instance.task_id == "train":
            self.bar = TrainingBar(self.run_dir_of(task_instance.run_id) / "metrics.jsonl", self.total_steps,
                                   self.out)

    @hookimpl
    def on_task_instance_success(self, previous_state, task_instance):
        self._finish(task_instance, "success")

    @hookimpl
    def on_task_instance_failed(self, previous_state, task_instance, error):
        self._finish(task_instance, "failed")
