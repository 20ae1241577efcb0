#!/usr/bin/env bash
# Serve every archive (.mar) of the model store with TorchServe in the foreground.
# The container's PID 1: it forwards SIGTERM/SIGINT as `torchserve --stop`, so Kubernetes
# stops the frontend and its Python workers cleanly within terminationGracePeriodSeconds.
#   TS_CONFIG_FILE    TorchServe config (default /etc/brst/config.properties)
#   BRST_MODEL_STORE  folder of .mar files (default /models)
#   BRST_MODELS       what to load: "all" or space-separated "name=file.mar" (default all)
#   TEMP              writable folder for TorchServe's temporary files (default /tmp)
#   BRST_ARCHIVE_PUBLIC_KEY  trusted public key(s): PEM files or folders of them, ':'-separated;
#                     TorchServe then serves private, checked copies of signed .mar files only
#   BRST_MODEL_VERSIONS      optional "name=version ...": the version each archive must be signed for
#   BRST_ALLOW_UNSIGNED      1: serve unsigned archives when no key is set (a warning); otherwise
#                     the container refuses to start without a key
set -euo pipefail

export TS_CONFIG_FILE="${TS_CONFIG_FILE:-/etc/brst/config.properties}"
export TEMP="${TEMP:-/tmp}"
model_store="${BRST_MODEL_STORE:-/models}"
read -r -a models <<< "${BRST_MODELS:-all}"

fail() {
    echo "entrypoint-serve: error: $1" >&2
    exit 2
}
compgen -G "${model_store}/*.mar" > /dev/null || fail "${model_store}: no .mar archive in the model store"
if [ "${models[0]}" != "all" ]; then
    for model in "${models[@]}"; do
        archive="${model#*=}"
        [ -f "${model_store}/${archive}" ] || fail "${model_store}/${archive}: no such archive (BRST_MODELS=${BRST_MODELS:-})"
    done
fi
# Signatures (or the explicit switch to serve unsigned) and whether this image's brst can load each
# archive are checked here, with one line on failure, not as a worker crash loop. With a key, the
# checked bytes are copied into a private store that TorchServe is started on: nothing written to
# the shared model store after this check is served.
plan=$(python -m brst.handlers.serving_store --model-store "${model_store}" --private-parent "${TEMP}" "${models[@]}") \
    || exit 2
mapfile -t plan_lines <<< "${plan}"
serve_store="${plan_lines[0]}"
models=("${plan_lines[@]:1}")

stopping=0
stop() {
    stopping=1
    # TorchServe resets open connections when it stops: let the requests in flight finish first
    # (the pod has left the Service's endpoints by now: preStop pause).
    python -m brst.handlers.drain --config "${TS_CONFIG_FILE}" || true
    torchserve --stop || true
}
trap stop TERM INT

torchserve --start --foreground --ncs \
    --ts-config "${TS_CONFIG_FILE}" --model-store "${serve_store}" --models "${models[@]}" &
server=$!
# A trapped signal interrupts `wait`; then wait again for the server's own exit status.
status=0
wait "${server}" || status=$?
if [ "${stopping}" -eq 1 ]; then
    status=0
    wait "${server}" || status=$?
fi
exit "${status}"
