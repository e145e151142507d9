#!/bin/sh
# The container's entrypoint: `gateway ARGS`, after two steps.
#   1. The LMK: GATEWAY_LMK (or GATEWAY_SECURITY__LMK_FILE) from the environment wins; else a file
#      secret at $GATEWAY_LMK_SECRET (default /run/secrets/gateway_lmk). Docker mounts secrets
#      readable by all (0444) and the gateway refuses an LMK file others can read, so it is copied to
#      an owner-only file in a private runtime directory and handed over as GATEWAY_SECURITY__LMK_FILE.
#      Every command gets it: the key ceremony's `keys ...` in one-off containers as well as `serve`.
#   2. For `serve`: `gateway config check` with the same environment (every problem at once, before
#      anything opens), then exec `gateway serve ...`: the gateway replaces this shell (PID 1) and
#      gets SIGTERM itself.
# tests/test_docker.py runs these same steps outside Docker.
set -eu

lmk_secret="${GATEWAY_LMK_SECRET:-/run/secrets/gateway_lmk}"
runtime_dir="${GATEWAY_RUNTIME_DIR:-/tmp/gateway}"
if [ -z "${GATEWAY_LMK:-}" ] && [ -z "${GATEWAY_SECURITY__LMK_FILE:-}" ] && [ -f "$lmk_secret" ]; then
    umask 077
    mkdir -p "$runtime_dir"
    chmod 700 "$runtime_dir"
    cp "$lmk_secret" "$runtime_dir/lmk"
    chmod 600 "$runtime_dir/lmk"
    GATEWAY_SECURITY__LMK_FILE="$runtime_dir/lmk"
    export GATEWAY_SECURITY__LMK_FILE
fi

if [ "${1:-}" != "serve" ]; then
    exec gateway "$@"
fi
shift
config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "--config" ]; then config="$arg"; fi
    previous="$arg"
done
gateway config check ${config:+"$config"} >/dev/null
exec gateway serve "$@"
