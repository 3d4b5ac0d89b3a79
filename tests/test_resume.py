"""Checkpoints and exact resume: a training process killed with SIGKILL and resumed ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import checkpoint_dirs
from tests.conftest import ROOT, tiny_config, write_config


def _train_cmd(config: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--config", str(config), *(["--resume"] if resume else [])]


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_after_a_real_kill_is_bit_identical(tmp_path, shapes_data, embedding_cache):
    train = {"max_steps": 24, "checkpoint_every": 4, "keep_last": 2, "log_every": 2}
    ctx = {"cache_dir": str(embedding_cache)}
    full_cfg = write_config(tmp_path / "full.yaml", tiny_config(tmp_path / "full", shapes_data, train=train,
                                                                 context=ctx))
    kill_cfg = write_config(tmp_path / "kill.yaml", tiny_config(tmp_path / "kill", shapes_data, train=train,
                                                                 context=ctx))
    subprocess.run(_train_cmd(full_cfg), check=True, cwd=ROOT, capture_output=True, timeout=300)

    run = tmp_path / "kill" / "run"
    proc = subprocess.Popen(_train_cmd(kill_cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(d.name >= "step-0000008" for d in checkpoint_dirs(run)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no clean stop: the process dies wherever it is
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists(), "the run finished before it was killed; the test proves nothing"
    killed_at = max(int(d.name.split("-")[1]) for d in checkpoint_dirs(run))
    assert 8 <= killed_at < 24

    subprocess.run(_train_cmd(kill_cfg, resume=True), check=True, cwd=ROOT, capture_output=True, timeout=300)
    a, b = _final_weights(tmp_path / "full" / "run"), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the raw (non-EMA) weights of the last checkpoint match too
    ra = load_file(str(checkpoint_dirs(tmp_path / "full" / "run")[-1] / "unet.safetensors"))
    rb = load_file(str(checkpoint_dirs(run)[-1] / "unet.safetensors"))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    # metrics: each step logged once, although some steps ran twice
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    assert len(checkpoint_dirs(run)) == 2  # keep_last
    assert not list((run / "checkpoints").glob("*.tmp-*"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, shapes_data, embedding_cache):
    """Weights poisoned with NaN (e.g. a bad fine-tuning start) make the loss NaN at the first step."""
    from pipeline.config import Config
    from pipeline.errors import TrainingDiverged
    from pipeline.train import train

    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 4, "checkpoint_every": 2},
                      context={"cache_dir": str(embedding_cache)})
    train(Config.model_validate(raw), progress=False)
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    weights = load_file(str(ckpt / "unet.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "conv_in" in k else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(ckpt / "unet.safetensors"))
    before = (ckpt / "unet.safetensors").read_bytes()
    raw["train"]["max_steps"] = 8
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5.*intact"):
        train(Config.model_validate(raw), resume=True, progress=False)
    assert (ckpt / "unet.safetensors").read_bytes() == before
    assert checkpoint_dirs(tmp_path / "run")[-1] == ckpt
