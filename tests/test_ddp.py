"""Data-parallel training (pipeline/training/distributed.py) on CPU: 2 gloo ranks started by torchrun.

With the same global batch, 2 ranks compute what 1 process computes (each rank takes its half of every
global batch and all random draws cover the global batch); only the summation order of the gradient
all-reduce differs, so the weights agree to float precision, not bit for bit. A checkpoint written by one
process resumes under two, because the sample-stream position is global.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.training.checkpoints import checkpoint_dirs
from tests.conftest import ROOT, tiny_config, write_config

# grad_accum 2 covers DDP's no_sync path; batch 8 / 2 ranks = 4 samples per rank per micro-batch;
# random_flip and CFG dropout (default 0.1) cover the other random draws that must not depend on the world size.
TRAIN = {"max_steps": 6, "checkpoint_every": 3, "keep_last": 3, "log_every": 1, "batch_size": 8, "grad_accum": 2}
# Float32 gradients summed in a different order, through 6 AdamW steps: max |diff| 2.6e-6 observed on AMD CPUs, 2.05e-5
# on an Intel Xeon with AVX-512 VNNI (oneDNN's kernels round differently at batch 4 and 8). The bound stays
# a twentieth of what steps 4..6 alone move the weights (asserted below), so a rank's wrong update still fails it.
TOLERANCE = 5e-5


def _config(tmp: Path, name: str, shapes_data: Path, cache: Path) -> Path:
    cfg = tiny_config(tmp / name, shapes_data, train=TRAIN, context={"cache_dir": str(cache / "emb")},
                      data={"prepared_cache": str(cache / "prepared"), "random_flip": True})
    return write_config(tmp / f"{name}.yaml", cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank: 2 ranks on a 2-core machine
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _train(config: Path, *args: str, nproc: int = 1) -> None:
    if nproc == 1:  # the plain single-process path: no torchrun, no torch.distributed
        _run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), *args])
        return
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-addr",
          "127.0.0.1", "--master-port", str(_free_port()), "-m", "pipeline.cli", "train", "--config", str(config),
          *args])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _weights(run: Path) -> tuple[dict, dict]:
    """(raw weights of the last checkpoint, EMA weights of the shipped model)."""
    raw = load_file(str(checkpoint_dirs(run)[-1] / "unet.safetensors"))
    return raw, load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: only rank 0 may log"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shapes_data) -> tuple[Path, Path]:
    """The reference: one plain process (no torchrun). Returns (tmp folder, its run dir)."""
    tmp = tmp_path_factory.mktemp("ddp")
    _train(_config(tmp, "single", shapes_data, tmp))
    return tmp, tmp / "single" / "run"


@pytest.mark.slow
def test_two_ranks_match_one_process(one_process, shapes_data):
    tmp, single = one_process
    _train(_config(tmp, "ddp", shapes_data, tmp), nproc=2)
    ddp = tmp / "ddp" / "run"

    (raw1, ema1), (raw2, ema2) = _weights(single), _weights(ddp)
    # the comparison means something only if training moved the weights far more than the tolerance
    first = load_file(str(checkpoint_dirs(single)[0] / "unet.safetensors"))
    assert _max_diff(first, raw1) > 20 * TOLERANCE  # steps 4..6 alone moved a weight by 3e-3
    assert _max_diff(raw1, raw2) < TOLERANCE
    assert _max_diff(ema1, ema2) < TOLERANCE
    l1, l2 = _losses(single), _losses(ddp)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    assert all(abs(l1[s] - l2[s]) < 1e-4 for s in l1), (l1, l2)  # rank 0 logs the global batch's loss
    assert [d.name for d in checkpoint_dirs(ddp)] == ["step-0000003", "step-0000006"]


@pytest.mark.slow
def test_two_ranks_resume_a_one_process_checkpoint(one_process, shapes_data):
    tmp, single = one_process
    run = tmp / "resumed" / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(single / "checkpoints" / "step-0000003", run / "checkpoints" / "step-0000003")
    _train(_config(tmp, "resumed", shapes_data, tmp), "--resume", nproc=2)

    assert sorted(_losses(run)) == [4, 5, 6]  # continued from step 3, not from scratch
    (raw1, ema1), (raw2, ema2) = _weights(single), _weights(run)
    assert _max_diff(raw1, raw2) < TOLERANCE
    assert _max_diff(ema1, ema2) < TOLERANCE


def test_rank_slices_rebuild_the_global_batch():
    """The ranks' rows of a global batch, in rank order, are that batch: nothing read twice or skipped."""
    from pipeline.training.batches import batch_indices
    from pipeline.training.distributed import Part

    batch = batch_indices(50, 0, 40, 12)  # crosses an epoch boundary
    for world in (1, 2, 3, 4):
        parts = [Part(r, world).take(batch) for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)


def test_batch_not_divisible_by_world_size_is_a_clear_error(monkeypatch):
    from pipeline.training.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match=r"train.batch_size \(8\) must be divisible by the number of processes \(3\)"):
        setup({"train.batch_size": 8})
    with pytest.raises(UserError, match=r"train.cycles\[1\].batch_size \(4\) must be divisible"):
        setup({"train.batch_size": 6, "train.cycles[1].batch_size": 4})
