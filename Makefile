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
# The k8s-local kit's build of the Kubernetes binaries (tests/deploy/test_k8s_admission.py, make
# k8s-e2e): a build artifact kept outside the tests' throwaway HOME, keyed by the source tarball's
# sha256. Missing, the first `make test` builds it (about 6 min on 2 cores); then 0 s.
export K8S_LOCAL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/brst-k8s-local

.PHONY: venv test-servers lint grpc-stubs test test-fast demo bench clean k8s-e2e k8s-cohort constraints pin-images

$(BIN)/brst-train: pyproject.toml handlers/stain/_remix.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(BIN)/brst-train

# Servers the tests run for real that pip cannot install (Orthanc + DICOMweb + WSI dicomizer)
test-servers:
	bash deploy/install-test-servers.sh

# ruff with the rules in pyproject.toml ([tool.ruff]); `make test` runs it first
lint: venv
	$(BIN)/python -m ruff check .

# The committed gRPC stubs (train/serve/ts_grpc/) from the installed TorchServe's protos: after a
# TorchServe upgrade (tests/train/serve/test_grpc_stubs.py says when they differ)
grpc-stubs: venv
	$(BIN)/python -m brst.train.serve.grpc_stubs

# Tests run with a fresh, empty home and cache folder (removed afterwards), so no cache left on
# this machine by an earlier run (matplotlib, torch hub, ...) can hide a fault that
# a fresh machine would show. The venv's pip cache is the only per-user state kept.
test: venv lint test-servers
	scratch=$$(mktemp -d -t brst-test-home.XXXXXX) && trap 'rm -rf "$$scratch"' EXIT && \
	HOME=$$scratch XDG_CACHE_HOME=$$scratch/.cache XDG_CONFIG_HOME=$$scratch/.config \
	MPLCONFIGDIR=$$scratch/.config/matplotlib TORCH_HOME=$$scratch/.cache/torch \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not serve and not k8s_local" $(PYTEST_ARGS)

demo: venv
	BRST_DATA="$(BRST_DATA)" DEMO="$(DEMO)" bash deploy/demo.sh

# A one-node Kubernetes cluster on this machine (root, ../shared/k8s-local): builds the CPU serving
# and training images from a local Debian base, serves brst.mar through the cpu overlay and checks
# predictions, metrics, a rollout, pod replacement and the Jobs; tears everything down (docs/DEPLOY.md).
k8s-e2e: venv
	$(BIN)/python deploy/k8s_e2e.py

# The cohort as an indexed Job on the same kind of one-node cluster (root): 11 slides made from the
# HER2ST sections (JPEG, tiled TIFF, a DICOM folder, one unreadable file), 3 shards 2 at a time, a pod
# deleted mid-run, the outputs compared with one process here, a rerun that skips everything.
k8s-cohort: venv
	$(BIN)/python deploy/k8s_cohort.py

bench: venv
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) logs .pytest_cache .ruff_cache

# deploy/constraints.txt from this venv: the versions the images install (run after changing the venv)
constraints: venv
	$(BIN)/python deploy/pin_constraints.py

# an overlay's image pinned to the digest of the image you pushed (docs/DEPLOY.md, "Image digests"):
#   make pin-images OVERLAY=k8s/overlays/hospital IMAGE=registry.hospital.example/brst/brst-serve:0.2.0
pin-images: venv
	$(BIN)/python deploy/pin_images.py "$(OVERLAY)" "$(IMAGE)"
