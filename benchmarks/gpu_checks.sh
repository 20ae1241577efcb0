#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (a few minutes on an H100): the device-aware
# tests on CUDA (float32, then the stain tests in float64), the TorchServe handler on a GPU,
# and the GPU benchmarks (stain normalisation, a training step). CI has no GPU; run this on a
# GPU machine and record the figures in docs/BENCHMARKS.md ("GPU").
#
#   usage: bash benchmarks/gpu_checks.sh OUT_DIR
#
# Needs brst and its test dependencies importable (pip install -e '.[dev]'), and the real
# data in ../shared/data (or BRST_SHARED_DATA pointing at it). Exits non-zero if any step failed.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
data=${BRST_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
export BRST_SHARED_DATA=$data BRST_DATA=$data/her2st BRST_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=()

step() {  # step NAME COMMAND...: run, keep its output in OUT_DIR/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
step tests_cuda $python -m pytest -q -p no:cacheprovider --log-level=INFO -o log_cli=false \
    tests/handlers/test_stain.py tests/handlers/test_stain_fused.py tests/handlers/test_transforms.py tests/handlers/test_targets.py tests/handlers/test_models.py \
    tests/train/fit/test_fit.py tests/train/fit/test_resume.py tests/handlers/test_handler.py
BRST_TEST_DTYPE=float64 step tests_cuda_float64 $python -m pytest -q -p no:cacheprovider tests/handlers/test_stain.py
step bench_stain_b64 $python benchmarks/bench_stain.py --device cuda --rounds 5
step bench_stain_b256 $python benchmarks/bench_stain.py --device cuda --rounds 5 --per-section 128 --batch 256
step bench_train_step $python benchmarks/bench_train_step.py --device cuda --rounds 3 --workers 4
step bench_train_step_224 $python benchmarks/bench_train_step.py --device cuda --rounds 3 --workers 8 \
    --input-size 224 --batch-size 64

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
