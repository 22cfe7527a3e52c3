#!/usr/bin/env bash
# Runs ON the lent GPU machine (no network), from the repository root the device tool copied:
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=600)
# after benchmarks/prepare_device_wheels.sh filled .whl/ here. Installs the carried wheels
# into /tmp/site, then benchmarks in two parts so that the first (SD1.5 512², SDXL 1024²: the
# numbers the issues set goals for) survives if time runs out for the second (SD1.5 1024²,
# SDXL 512²). First, the cost ledger on the device (real CUDA kernel counts next to the
# dispatched-op counts; micro models, about a minute). Leaves in $OUT: RESULTS.md (the fragment to
# append to benchmarks/RESULTS.md: ledger, then tables), primary.json / secondary.json (every
# timed step), bench.log, machine.txt.
# Extra arguments go to both parts, e.g. `--quick` or `--scenarios unpatched,pva_joint`.
# A dry run on a workstation: PYTHON=.venv/legacy/bin/python BENCH_DEVICE=cpu OUT=/tmp/o bash benchmarks/device_run.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET_S:-540}"  # seconds for both parts, inside the 600 s call
PY="${PYTHON:-python3}"  # on the device image, python3 is the one with torch
DEVICE="${BENCH_DEVICE:-cuda}"
START=$SECONDS

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: run benchmarks/prepare_device_wheels.sh on the workstation and carry .whl" | tee "$OUT/bench.log"
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BENCH_GIT_COMMIT="$(cat .whl/commit.txt 2>/dev/null || echo unknown)"

# the card as found (read-only queries; its settings are never changed)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/machine.txt" 2>&1 || true

status=0
run_part() {  # name, then arguments for benchmarks.run
  local name=$1
  shift
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 60)); then
    echo "skipping the $name part: only ${left} s left of ${BUDGET}" | tee -a "$OUT/bench.log"
    status=3
    return
  fi
  echo "== $name part (${left} s left)" | tee -a "$OUT/bench.log"
  timeout --signal=INT --kill-after=15 "$left" \
    "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUT/RESULTS.md" --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    echo "the $name part exited with $rc" | tee -a "$OUT/bench.log"
    status=$rc
  fi
}

# the ledger: counts, not timings, so it fits anywhere; its failure does not stop the timed parts
echo "== cost ledger on $DEVICE" | tee -a "$OUT/bench.log"
timeout --signal=INT --kill-after=15 "${LEDGER_BUDGET_S:-150}" \
  "$PY" -m benchmarks.cost_ledger --device "$DEVICE" --configs sd15:16 --out "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/bench.log"
ledger_rc=${PIPESTATUS[0]}
((ledger_rc == 0)) || { echo "the cost ledger exited with $ledger_rc" | tee -a "$OUT/bench.log"; status=$ledger_rc; }

run_part primary --configs sd15:64,sdxl:128 "$@"
run_part secondary --configs sd15:128,sdxl:64 --tasks none "$@"
exit $status
