#!/usr/bin/env bash
# `make demo`: the whole path on real HER2ST data, end to end, on this machine's CPU (or GPU):
#   prepare -> inspect -> short training -> evaluate -> archive -> serve -> predict over HTTP
#   and gRPC -> a few Prometheus metrics -> stop.
# Inputs: BRST_DATA (the HER2ST data/ folder), DEMO (output folder, default demo/).
# A prepared dataset and a trained run are reused when present (delete $DEMO to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO=${DEMO:-demo}
DATA=${BRST_DATA:-}
EPOCHS=${DEMO_EPOCHS:-3}

if [ -z "$DATA" ] || [ ! -d "$DATA" ]; then
  echo "demo: no HER2ST data: set BRST_DATA to the folder with ST-cnts/, ST-imgs/, ST-spotfiles/," >&2
  echo "      or download it with: $BIN/brst-train fetch her2st --dest data/her2st" >&2
  exit 2
fi
mkdir -p "$DEMO"
step() { printf '\n== %s\n' "$*"; }

step "1. prepare: HER2ST sections -> $DEMO/her2st.h5 (384 um patches at 2 um/px, the small-cohort recipe's field)"
[ -f "$DEMO/her2st.h5" ] || $BIN/brst-train prepare --format her2st --root "$DATA" --out "$DEMO/her2st.h5" \
  --patch-um 384 --um-per-px 2
$BIN/brst-train inspect "$DEMO/her2st.h5" --contact-sheet "$DEMO/contact_sheet.png"

step "2. train with --recipe small-cohort for $EPOCHS epoch(s) (holding out the last section)"
[ -f "$DEMO/run/last.pt" ] || $BIN/brst-train --recipe small-cohort --data "$DEMO/her2st.h5" --out "$DEMO/run" \
  --epochs "$EPOCHS" --workers 0

step "3. evaluate on the held-out section, with the trivial baselines beside the model"
$BIN/brst-train evaluate --checkpoint "$DEMO/run/last.pt" --data "$DEMO/her2st.h5" --out "$DEMO/eval"

step "4. archive -> $DEMO/model_store/brst.mar"
$BIN/brst-train archive --checkpoint "$DEMO/run/last.pt" --model-name brst --model-store "$DEMO/model_store" --force

step "5. serve with TorchServe on free loopback ports"
rm -f "$DEMO/serve/endpoints.json"
$BIN/brst-train serve --model-store "$DEMO/model_store" --model-name brst --run-dir "$DEMO/serve" --free-ports &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  [ -f "$DEMO/serve/endpoints.json" ] && break
  kill -0 $SERVER 2>/dev/null || { echo "demo: TorchServe did not start; see $DEMO/serve/logs" >&2; exit 1; }
  sleep 1
done
endpoint() { $BIN/python -c "import json,sys; print(json.load(open('$DEMO/serve/endpoints.json'))['$1'])"; }
HTTP=$(endpoint inference); GRPC=$(endpoint grpc_inference); METRICS=$(endpoint metrics)

step "6. predict three held-out patches over HTTP ($HTTP) and gRPC ($GRPC), measured values beside"
# the held-out spots with the lowest, median and highest measured value of the gene the run
# validated best; the four best-validated genes are shown
rm -rf "$DEMO/patches"
$BIN/python deploy/demo_patches.py pick "$DEMO/run/last.pt" "$DEMO/her2st.h5" "$DEMO/patches"
$BIN/brst-train predict --endpoint "$HTTP" --model-name brst "$DEMO"/patches/*.png \
  | $BIN/python deploy/demo_patches.py compare "$DEMO/patches"
$BIN/brst-train predict --endpoint "grpc://$GRPC" --model-name brst "$DEMO"/patches/*.png \
  | $BIN/python deploy/demo_patches.py compare "$DEMO/patches"

step "7. a few Prometheus metrics from $METRICS/metrics"
curl -s "$METRICS/metrics" | grep -E '^(brst_patches_total|brst_rejected_inputs_total|ts_inference_requests_total)' | head -8

step "8. stop"
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT
echo "demo: done; outputs in $DEMO/ (dataset, run, eval, model_store, serve logs)"
