#!/usr/bin/env bash
# Start a training run, or resume it when its directory already has a checkpoint: what a retried
# Kubernetes Job pod (or a restarted torchrun worker) needs. Extra arguments go to `brst-train fit`.
#   BRST_RUN_DIR  the run directory (required), e.g. /runs/inception_v3
#   BRST_ARCH     the architecture of a new run (default inception_v3)
#   BRST_DATASET  HDF5 file(s) or folder (read by brst-train fit itself)
set -euo pipefail

run_dir="${BRST_RUN_DIR:?set BRST_RUN_DIR to the run directory}"
if [ -e "${run_dir}/last.pt" ]; then
    start=(--resume "${run_dir}")
else
    start=(--arch "${BRST_ARCH:-inception_v3}" --out "${run_dir}")
fi
exec brst-train fit "${start[@]}" "$@"
