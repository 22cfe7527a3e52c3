# The two commands of README.md: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: env demo test test-fast bench clean

env:
	@bash scripts/bootstrap.sh

demo: env
	$(PY) scripts/demo.py --out demo_out

test: env
	$(PY) -m pytest -c tests/pytest.ini tests -q -rs --durations=15

test-fast: env
	$(PY) -m pytest -c tests/pytest.ini tests -q -m "not slow"

# make bench BENCH_ARGS="--quick"  (see benchmarks/README.md)
bench: env
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf .cache demo_out
