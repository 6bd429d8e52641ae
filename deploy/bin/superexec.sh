#!/usr/bin/env bash
# The coordinator's SuperExec: starts the ServerApp of every run submitted to the SuperLink (coordinator.sh,
# started with --isolation process) and keeps it running while the SuperLink restarts. It connects to the
# SuperLink over TLS on the coordinator itself; it listens on nothing. Checkpoints, round log and model are
# written here, in the run folder given to `fedpath run --out`.
#
# Environment (defaults in brackets):
#   FEDPATH_KEYS       folder with ca.crt                                  [/etc/fedpath]
#   FEDPATH_STATE      folder for Flower's app cache                       [/var/lib/fedpath]
#   FEDPATH_SUPERLINK  the SuperLink's local address on this machine       [127.0.0.1:${FEDPATH_LOCAL_PORT:-9093}]
set -euo pipefail

keys="${FEDPATH_KEYS:-/etc/fedpath}"
state="${FEDPATH_STATE:-/var/lib/fedpath}"
if [[ ! -r "$keys/ca.crt" ]]; then
    echo "superexec.sh: $keys/ca.crt is missing or unreadable (set FEDPATH_KEYS)" >&2
    exit 78
fi
mkdir -p "$state/superexec"
export FLWR_HOME="$state/superexec"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1

exec flower-superexec --runtime-api-address "${FEDPATH_SUPERLINK:-127.0.0.1:${FEDPATH_LOCAL_PORT:-9093}}" \
    --root-certificates "$keys/ca.crt"
