#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run of at most 8 minutes on an H100: the
# device-aware tests on CUDA (float32, then the stain tests in float64; the training step
# without a host sync, --compile), the TorchServe handler on a GPU, and the GPU benchmarks:
# the training step of efficientnet_b0 (224 px), resnet50 (224) and inception_v3 (299) at
# batch 64 and 256 against the bare timm loop in its best form (fit's defaults, then fit's
# --compile), TorchServe on the GPU vs the same model in process (HTTP and gRPC, batching on),
# stain normalisation. CI has no GPU; run this on a GPU machine and record the figures in
# docs/BENCHMARKS.md ("GPU").
#
#   usage: bash benchmarks/gpu_checks.sh OUT_DIR
#
# Every step's output goes to OUT_DIR/NAME.log. Steps run most wanted first, each within its
# own time limit and the whole run within a budget (GPU_CHECKS_BUDGET_S, default 460 s): a
# step with less than half its limit left is skipped; a failed or timed-out step does not
# stop the others. GPU_CHECKS_STEPS (a bash regex on step names, e.g. '_b64|compile') runs
# only those. The summary at the end has one line per step (benchmarks: ours, reference,
# ratio) and is also written to OUT_DIR/summary.txt.
# Needs brst and its test dependencies importable (pip install -e '.[dev]'), and the real
# data in ../shared/data (or BRST_SHARED_DATA pointing at it). Exits non-zero if any step
# failed, timed out or was skipped.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=${BRST_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
export BRST_SHARED_DATA=$data BRST_DATA=$data/her2st BRST_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET_S:-460}
names=() states=()

step() {  # step NAME LIMIT_S COMMAND...: run within LIMIT_S (less if the budget is short), log to OUT_DIR/NAME.log
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS))
    [[ -z ${GPU_CHECKS_STEPS:-} || $name =~ $GPU_CHECKS_STEPS ]] || return 0
    names+=("$name")
    if [ "$left" -lt 30 ] || [ "$left" -lt $((limit / 2)) ]; then  # too little left to be worth starting
        echo "== $name: SKIPPED (${left} s of the budget left)" | tee "$out/$name.log"
        states+=(skipped); return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
    local rc=$?
    case $rc in
        0) states+=(ok) ;;
        124|137) states+=("timeout ${limit}s") ;;
        *) states+=("failed rc=$rc") ;;
    esac
}

summary() {  # one line per step: name, state, and a benchmark's ours / reference / ratio (its last JSON line)
    printf '%-40s %-16s %12s %12s %7s  %s\n' step state ours reference ratio unit
    local i
    for i in "${!names[@]}"; do
        $python - "$out/${names[$i]}.log" "${names[$i]}" "${states[$i]}" <<'EOF'
import json, sys
path, name, state = sys.argv[1:4]
row = {}
try:
    for line in open(path, errors="replace"):
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                pass
except OSError:
    pass
print(f"{name:40} {state:16} {row.get('ours', ''):>12} {row.get('reference', ''):>12} {row.get('ratio', ''):>7}  "
      f"{row.get('unit', '')}")
EOF
    done
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(),
'bf16', torch.cuda.is_bf16_supported(including_emulation=False))" | tee -a "$out/gpu.txt"
dataset=$out/her2st56.h5  # the benchmarks' patches, prepared once (56 px, 2 um/px, as the tests' fixture)
$python -c "import sys; from pathlib import Path; from brst.train.data.prepare import PrepareOptions, prepare;
prepare('her2st', Path(sys.argv[1]), out=Path(sys.argv[2]), options=PrepareOptions(um_per_px=2.0))" \
    "$BRST_DATA" "$dataset" > "$out/prepare.log" 2>&1 || echo "prepare failed: see $out/prepare.log"

pytest=($python -m pytest -q -p no:cacheprovider --log-level=INFO -o log_cli=false)
step tests_cuda_step 100 "${pytest[@]}" tests/train/fit/test_step.py  # no host sync in the step, --compile
step tests_cuda 150 "${pytest[@]}" tests/handlers/test_stain.py tests/handlers/test_stain_fused.py \
    tests/handlers/test_transforms.py tests/handlers/test_targets.py tests/handlers/test_models.py \
    tests/train/fit/test_fit.py tests/train/fit/test_resume.py tests/handlers/test_handler.py

train=(benchmarks/bench_train_step.py --device cuda --data "$dataset" --workers 8 --rounds 3 --steps 4)
train_step() {  # train_step ARCH INPUT BATCH [compile [LIMIT_S]]
    step "train_$1_$2_b$3${4:+_compile}" "${5:-50}" $python "${train[@]}" --arch "$1" --input-size "$2" \
        --batch-size "$3" ${4:+--compile}
}
train_step efficientnet_b0 224 256
train_step resnet50 224 256
train_step inception_v3 299 256
step serve_cuda 100 $python benchmarks/bench_serve.py --device cuda --patches 256 --batch 32 --rounds 2
train_step efficientnet_b0 224 256 compile 120
train_step efficientnet_b0 224 64
train_step resnet50 224 64
train_step inception_v3 299 64
train_step resnet50 224 256 compile 120
train_step efficientnet_b0 224 64 compile 120
train_step inception_v3 299 256 compile 150
BRST_TEST_DTYPE=float64 step tests_cuda_float64 40 "${pytest[@]}" tests/handlers/test_stain.py
step bench_stain_b64 40 $python benchmarks/bench_stain.py --device cuda --rounds 5
step bench_stain_b256 40 $python benchmarks/bench_stain.py --device cuda --rounds 5 --per-section 128 --batch 256

echo "== summary ($SECONDS s)"
summary | tee "$out/summary.txt"
for state in "${states[@]}"; do
    [ "$state" = ok ] || { echo "NOT ALL GPU CHECKS PASSED"; exit 1; }
done
echo "all GPU checks passed"
