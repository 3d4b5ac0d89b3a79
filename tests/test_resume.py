"""Checkpoints and exact resume: a training process killed with SIGKILL and resumed ends bit-identical."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pipeline.training.loop
from pipeline.config import Config, TrainConfig, load_config, load_saved_config
from pipeline.errors import TrainingDiverged, UserError
from pipeline.model.folder import load_model
from pipeline.training.batches import batch_indices, batch_loader
from pipeline.training.checkpoints import checkpoint_dirs, load_checkpoint
from pipeline.training.loggers import JsonlLogger
from pipeline.training.loop import train
from pipeline.training.objective import diffusion_loss
from pipeline.training.schedule import Schedule
from tests.conftest import ROOT, tiny_config, write_config


def _train_cmd(config: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config),
            *(["--resume"] if resume else [])]


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resume_after_a_real_kill_is_bit_identical(tmp_path, shapes_data, embedding_cache):
    # a warm restart at step 12, from batch 8 to batch 4: the resumed run crosses it or starts after it,
    # bit-identical either way
    train = {"cycles": [{"steps": 12}, {"steps": 12, "batch_size": 4}], "checkpoint_every": 4, "keep_last": 2,
             "log_every": 2}
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
    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 4, "checkpoint_every": 2},
                      context={"cache_dir": str(embedding_cache)})
    train(Config.model_validate(raw), progress=False)
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    weights = load_file(str(ckpt / "unet.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "conv_in" in k else v for k, v in weights.items()}

    save_file(weights, str(ckpt / "unet.safetensors"))
    before = (ckpt / "unet.safetensors").read_bytes()
    raw["train"]["max_steps"] = 8
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5.*intact"):
        train(Config.model_validate(raw), resume=True, progress=False)
    assert (ckpt / "unet.safetensors").read_bytes() == before
    assert checkpoint_dirs(tmp_path / "run")[-1] == ckpt


def test_warm_restart_starts_a_fresh_cycle_of_lr_optimizer_and_ema(tmp_path, shapes_data, embedding_cache):
    """train.cycles: at a new cycle the lr warms up again to lr * lr_scale, Adam's moments start from zero and the
    EMA starts from the current weights, as when a finished run is fine-tuned."""
    schedule = Schedule(TrainConfig(warmup_steps=10, cycles=[{"steps": 60}, {"steps": 40, "lr_scale": 0.5,
                                                                            "warmup_steps": 5}]), 16)
    assert schedule.total_steps == 100
    assert schedule.lr_factor(9) == 1.0 and schedule.lr_factor(59) < 0.01  # warmed up, annealed to ~0 by step 60
    assert schedule.lr_factor(60) == 0.5 * 1 / 5 and schedule.lr_factor(64) == 0.5  # 5 warmup steps up to the scale
    assert schedule.lr_factor(99) < 0.01
    assert [schedule.restarts_at(s) for s in (0, 59, 60, 61)] == [False, False, True, False]

    train_cfg = {"cycles": [{"steps": 4}, {"steps": 2, "lr_scale": 0.5, "warmup_steps": 1}], "warmup_steps": 2,
                 "checkpoint_every": 1, "keep_last": 10, "log_every": 1}
    cfg = Config.model_validate(tiny_config(tmp_path, shapes_data, train=train_cfg,
                                            context={"cache_dir": str(embedding_cache)}))
    assert cfg.train.max_steps == 6  # the total of the cycles
    train(cfg, progress=False)
    ckpts = {int(d.name.split("-")[1]): d for d in checkpoint_dirs(tmp_path / "run")}
    before_unet, before_ema, before = load_checkpoint(ckpts[4])
    after_unet, after_ema, after = load_checkpoint(ckpts[5])
    adam_steps = [float(s["step"]) for s in after["optimizer"]["state"].values()]
    assert adam_steps and set(adam_steps) == {1.0}  # moments restarted at step 4: one update since
    assert {float(s["step"]) for s in before["optimizer"]["state"].values()} == {4.0}

    def max_gap(unet, ema):
        return max((unet[k] - ema[k]).abs().max().item() for k in ema)

    assert max_gap(before_unet, before_ema) > 1e-4  # an average over the first 4 steps
    assert max_gap(after_unet, after_ema) < 1e-6  # a fresh EMA's first update copies the weights (to rounding)
    lrs = {json.loads(x)["step"]: json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text()
           .splitlines() if '"loss"' in x}
    assert lrs[5] == pytest.approx(cfg.train.lr * 0.5)  # restart warmup of 1 step: at the scaled peak at once


def test_cycles_must_add_up_and_retired_keys_say_what_replaces_them(tmp_path, shapes_data):
    cycles = [{"steps": 5}, {"steps": 5, "lr_scale": 0.5}]
    with pytest.raises(ValueError, match=r"max_steps \(20\) is not the total of the cycles' steps \(5 \+ 5\)"):
        Config.model_validate(tiny_config(tmp_path, shapes_data, train={"max_steps": 20, "cycles": cycles}))
    assert Config.model_validate(tiny_config(tmp_path, shapes_data, train={"max_steps": 10, "cycles": cycles}))
    config = write_config(tmp_path / "old.yaml", tiny_config(tmp_path, shapes_data, train={"restart_at": 5}))
    with pytest.raises(UserError, match=r"train.restart_at: use train.cycles"):
        load_config(config)
    config = write_config(tmp_path / "floor.yaml", tiny_config(tmp_path, shapes_data,
                                                               diffusion={"loss_weight_floor": 0.25}))
    with pytest.raises(UserError, match=r"diffusion.loss_weight_floor: no longer a setting"):
        load_config(config)


def test_a_run_saved_with_restart_keys_is_read_as_its_cycles(tmp_path, shapes_data):
    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 30, "warmup_steps": 10})
    raw["train"] |= {"restart_at": 20, "restart_lr_scale": 0.5, "restart_batch_size": 16,
                     "first_cycle_resolution": 8, "restart_loss_weighting": None, "restart_precision": None}
    raw["diffusion"]["loss_weight_floor"] = 0.0
    raw["model"]["coord_frequencies"] = 0
    cfg = load_saved_config(write_config(tmp_path / "train_config.yaml", raw))
    assert [c.model_dump() for c in cfg.train.cycles] == [
        {"steps": 20, "lr_scale": 1.0, "warmup_steps": None, "batch_size": None, "resolution": 8},
        {"steps": 10, "lr_scale": 0.5, "warmup_steps": 5, "batch_size": 16, "resolution": None}]
    assert cfg.train.max_steps == 30


def test_second_cycle_batch_size_continues_the_sample_stream(tmp_path, shapes_data, embedding_cache, monkeypatch):
    """A cycle's batch_size: the cycle reads the stream on from where the one before stopped, in the new batch
    size; the checkpoint counts the samples seen."""
    t = TrainConfig(batch_size=8, grad_accum=3, cycles=[{"steps": 4}, {"steps": 6, "batch_size": 2}])
    schedule = Schedule(t, 16)
    assert [schedule.batch_size_at(s) for s in (0, 3, 4, 9)] == [8, 8, 2, 2]
    assert [schedule.samples_before(s) for s in (0, 4, 5, 10)] == [0, 96, 102, 132]
    assert Schedule(TrainConfig(batch_size=8, max_steps=10), 16).samples_before(7) == 56

    drawn = []  # the item indices of every batch the loop took, in order

    def recording_loader(*args, **kwargs):
        for batch in batch_loader(*args, **kwargs):
            drawn.append(batch[0])
            yield batch

    monkeypatch.setattr(pipeline.training.loop, "batch_loader", recording_loader)
    train_cfg = {"cycles": [{"steps": 3}, {"steps": 3, "batch_size": 2}], "checkpoint_every": 3, "log_every": 1}
    cfg = Config.model_validate(tiny_config(tmp_path, shapes_data, train=train_cfg,
                                            context={"cache_dir": str(embedding_cache)}))
    pipeline.training.loop.train(cfg, progress=False)
    n = len(pipeline.training.loop.open_training_data(cfg.data, cfg.ingest).captions)
    starts_and_sizes = [(0, 8), (8, 8), (16, 8), (24, 2), (26, 2), (28, 2)]
    assert len(drawn) == 6
    for batch, (start, size) in zip(drawn, starts_and_sizes, strict=True):
        assert torch.equal(batch, batch_indices(n, cfg.seed, start, size))
    ckpts = {int(d.name.split("-")[1]): d for d in checkpoint_dirs(tmp_path / "run")}
    assert load_checkpoint(ckpts[3])[2]["samples_seen"] == 24
    assert load_checkpoint(ckpts[6])[2]["samples_seen"] == 30


def test_first_cycle_trains_on_downsampled_images(tmp_path, shapes_data, embedding_cache, monkeypatch):
    """A cycle's resolution: in it the UNet sees the images area-averaged to that side, in the next at
    data.resolution; the saved model is a data.resolution model."""
    pixels, inputs = [], []

    def recording_loader(*args, **kwargs):
        for batch in batch_loader(*args, **kwargs):
            pixels.append(batch[1])
            yield batch

    def recording_loss(*args, **kwargs):
        inputs.append(args[3])  # diffusion_loss(model, spec, scheduler, x0, ...)
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(pipeline.training.loop, "batch_loader", recording_loader)
    monkeypatch.setattr(pipeline.training.loop, "diffusion_loss", recording_loss)
    train_cfg = {"cycles": [{"steps": 2, "resolution": 8}, {"steps": 2}]}
    cfg = Config.model_validate(tiny_config(tmp_path, shapes_data, train=train_cfg, tracking={"sample_every": 2,
                                            "sample_steps": 2}, context={"cache_dir": str(embedding_cache)}))
    pipeline.training.loop.train(cfg, progress=False, logger=JsonlLogger(tmp_path / "tracker"))  # a logger: grids
    assert [x.shape[-1] for x in inputs] == [8, 8, 16, 16]
    # the sample grids are drawn at the side each cycle trains at
    grids = [Image.open(tmp_path / "run" / "samples" / f"step-{s:07d}.png") for s in (2, 4)]
    assert 2 * grids[0].size[0] == grids[1].size[0] and 2 * grids[0].size[1] == grids[1].size[1]
    full = pixels[0].float() / 127.5 - 1
    pooled = torch.nn.functional.avg_pool2d(full, 2)
    for got, want in zip(inputs[0], pooled, strict=True):  # the random flip may mirror an image
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, want.flip(-1), atol=1e-5)
    assert load_model(tmp_path / "run" / "model").spec.resolution == 16

    def cycles_at(side):
        return {"cycles": [{"steps": 2, "resolution": side}, {"steps": 2}]}

    with pytest.raises(ValueError, match=r"train.cycles\[0\].resolution \(32\) is above data.resolution \(16\)"):
        Config.model_validate(tiny_config(tmp_path, shapes_data, train=cycles_at(32)))
    with pytest.raises(ValueError, match=r"train.cycles\[0\].resolution 6 must be divisible by model.patch_size"):
        Config.model_validate(tiny_config(tmp_path, shapes_data, train=cycles_at(6)))


def test_cpu_bf16_autocast_is_opt_in_and_resumes_bit_identical(tmp_path, shapes_data, embedding_cache, monkeypatch):
    """train.precision: on the CPU, "auto" and "fp32" train in fp32 and "bf16" under bf16 autocast; channels_last
    is off on the CPU by default. A bf16 run resumed from a checkpoint ends bit-identical to one that was not."""
    seen = []

    def recording_loss(*args, **kwargs):
        weight = args[0].conv_in.weight
        seen.append((torch.is_autocast_enabled("cpu"), weight.is_contiguous(memory_format=torch.channels_last)))
        return diffusion_loss(*args, **kwargs)

    monkeypatch.setattr(pipeline.training.loop, "diffusion_loss", recording_loss)

    def run(name: str, **train_cfg) -> Path:
        train_cfg = {"max_steps": 6, "checkpoint_every": 3, "keep_last": 2} | train_cfg
        raw = tiny_config(tmp_path / name, shapes_data, train=train_cfg, context={"cache_dir": str(embedding_cache)})
        return Path(pipeline.training.loop.train(Config.model_validate(raw), progress=False)).parent

    for precision, autocast in (("auto", False), ("fp32", False), ("bf16", True)):
        seen.clear()
        run(precision, precision=precision)
        assert seen == [(autocast, False)] * 6, precision
    seen.clear()
    run("bf16_cl", precision="bf16", channels_last=True)
    assert seen == [(True, True)] * 6

    # resume a copy of the bf16 run from its step-3 checkpoint: the same final weights as the uninterrupted run
    full = tmp_path / "bf16" / "run"
    resumed = tmp_path / "bf16_resumed" / "run"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(checkpoint_dirs(resumed)[-1])
    assert [d.name for d in checkpoint_dirs(resumed)] == ["step-0000003"]
    raw = tiny_config(tmp_path / "bf16_resumed", shapes_data, train={"max_steps": 6, "checkpoint_every": 3,
                      "keep_last": 2, "precision": "bf16"}, context={"cache_dir": str(embedding_cache)})
    pipeline.training.loop.train(Config.model_validate(raw), resume=True, progress=False)
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
