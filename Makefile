# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Where the demo's data comes from: $BRST_DATA, else ./data/her2st, else ../shared/data/her2st
BRST_DATA ?= $(firstword $(wildcard data/her2st) $(wildcard ../shared/data/her2st))
DEMO   ?= demo
PYTEST_ARGS ?=
# torch's CPU allocator backs large tensors with transparent huge pages: 1.25-1.5x faster CPU
# stain normalisation, inference and serving here (docs/BENCHMARKS.md); the images set it too
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: venv test test-fast demo bench clean

$(BIN)/brst-train: pyproject.toml handlers/stain/_remix.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(BIN)/brst-train

# Tests run with a fresh, empty home and cache folder (removed afterwards), so no cache left on
# this machine by an earlier run (gRPC stubs, matplotlib, torch hub, ...) can hide a fault that
# a fresh machine would show. The venv's pip cache is the only per-user state kept.
test: venv
	scratch=$$(mktemp -d -t brst-test-home.XXXXXX) && trap 'rm -rf "$$scratch"' EXIT && \
	HOME=$$scratch XDG_CACHE_HOME=$$scratch/.cache XDG_CONFIG_HOME=$$scratch/.config \
	MPLCONFIGDIR=$$scratch/.config/matplotlib TORCH_HOME=$$scratch/.cache/torch \
	BRST_GRPC_STUBS_DIR= OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not serve" $(PYTEST_ARGS)

demo: venv
	BRST_DATA="$(BRST_DATA)" DEMO="$(DEMO)" bash deploy/demo.sh

bench: venv
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) logs .pytest_cache
