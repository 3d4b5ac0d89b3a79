"""bench/gpu_bench.py's SD-1.5-size benchmark, dry-run on the CPU at tiny sizes (--smoke): the JSON it writes, the
batch search, and a FLOP count that follows the work done. On a GPU machine bench/gpu_check.sh runs it full size."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    return module


def reject_nan(name: str):
    raise AssertionError(f"{name} in the JSON")


def test_sd15_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "sd15.json"
    run = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--only", "sd15", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    sd15 = json.loads(out.read_text(), parse_constant=reject_nan)["sd15"]  # NaN or Infinity anywhere fails

    assert sd15["model"]["attention"] == ["AttnProcessor2_0"] and sd15["model"]["latents"] == [4, 16, 16]
    cached, online, checkpointing = sd15["cached"], sd15["online"], sd15["checkpointing"]
    for path in (cached, online, checkpointing):
        assert path["batch"] == 2 and path["img_per_s"] > 0 and path["flops_per_step"] > 0
        assert path["mfu"] is None if not torch.cuda.is_available() else 0 < path["mfu"] < 1
    assert cached["batch_search"] == {"1": "fits", "2": "fits"}
    # backward costs about twice the forward: the count is of the work done, not a constant
    assert 2 <= cached["flops_per_step"] / cached["forward_flops_per_step"] <= 4
    # the online step is the cached one plus the encoders' forward passes
    assert online["unet_flops_per_step"] == cached["flops_per_step"]
    assert online["flops_per_step"] == online["unet_flops_per_step"] + online["encoder_flops_per_step"]
    assert online["encoder_flops_per_step"] > 0 and online["batch_source"] == "the cached path's"
    # checkpointing recomputes part of the forward: more FLOPs counted than the model's
    assert checkpointing["flops_per_step"] > checkpointing["model_flops_per_step"] == cached["flops_per_step"]
    assert sd15["cached_over_online"] == pytest.approx(cached["img_per_s"] / online["img_per_s"], rel=0.01)


def test_flop_count_scales_with_the_batch_and_the_backward_pass():
    bench = load_gpu_bench()
    training = bench.UNetTraining(bench.SD15_SMOKE)
    one, two = (bench.cached_inputs(bench.SD15_SMOKE, batch) for batch in (1, 2))
    both_one, forward_one = bench.unet_step_flops(training, *one)
    both_two, forward_two = bench.unet_step_flops(training, *two)
    assert forward_one > 0 and 2 <= both_one / forward_one <= 4
    assert forward_two == pytest.approx(2 * forward_one, rel=0.01) and both_two == pytest.approx(2 * both_one, rel=0.01)


def test_batch_search_doubles_then_halves_the_gap():
    bench = load_gpu_bench()
    tried = []

    def fits_up_to_40(batch: int) -> bool:
        tried.append(batch)
        return batch <= 40

    assert bench.largest_batch(fits_up_to_40, 8, 256, 10)[0] == 40
    assert tried == [8, 16, 32, 64, 48, 40]
    assert bench.largest_batch(lambda b: True, 8, 256, 10)[0] == 256  # the cap ends the search
    assert bench.largest_batch(lambda b: True, 8, 256, 3) == (32, {"8": "fits", "16": "fits", "32": "fits"})
    assert bench.largest_batch(lambda b: b <= 20, 8, 256, 10, known_too_large=24)[0] == 16
    assert bench.largest_batch(lambda b: False, 8, 256, 10) == (0, {"8": "out of memory"})
