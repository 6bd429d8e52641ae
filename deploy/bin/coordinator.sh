#!/usr/bin/env bash
# The coordinator's SuperLink: TLS with the consortium's certificate, site authentication, a state database.
# `fedpath server start` runs two processes: the SuperLink on 127.0.0.1:$FEDPATH_LOCAL_PORT (Flower's Fleet,
# Control and Runtime APIs: operators, `fedpath run` and superexec.sh connect there, on this machine), and the
# Fleet gateway on $FEDPATH_HOST:$FEDPATH_PORT, the one socket open to the network, which passes only the
# Fleet API (what sites use) and refuses the Control API (submit runs, register keys). ServerApps run from
# superexec.sh so that a run survives a restart of this process. Run by the coordinator container, by
# fedpath-coordinator.service and by the tests.
#
# Environment (defaults in brackets):
#   FEDPATH_KEYS   folder with ca.crt, server.pem, server.key: deploy init's coordinator/   [/etc/fedpath]
#   FEDPATH_STATE  folder kept across restarts: state.db (runs, registrations), logs        [/var/lib/fedpath]
#   FEDPATH_HOST   interface to listen on                                                   [0.0.0.0]
#   FEDPATH_PORT   the one TCP port the sites connect to (Fleet API only)                   [8000]
#   FEDPATH_LOCAL_PORT  the SuperLink's own port, on 127.0.0.1 (operator commands)          [9093]
set -euo pipefail

keys="${FEDPATH_KEYS:-/etc/fedpath}"
state="${FEDPATH_STATE:-/var/lib/fedpath}"
for file in ca.crt server.pem server.key; do
    if [[ ! -r "$keys/$file" ]]; then
        echo "coordinator.sh: $keys/$file is missing or unreadable: copy deploy init's coordinator/ folder" \
            "to $keys (or set FEDPATH_KEYS)" >&2
        exit 78  # EX_CONFIG: systemd does not restart on it (RestartPreventExitStatus=78)
    fi
done
mkdir -p "$state"

exec fedpath server start \
    --host "${FEDPATH_HOST:-0.0.0.0}" --port "${FEDPATH_PORT:-8000}" --local-port "${FEDPATH_LOCAL_PORT:-9093}" \
    --tls "$keys/ca.crt" "$keys/server.pem" "$keys/server.key" \
    --enable-supernode-auth --database "$state/state.db" \
    --isolation process --flwr-home "$state/superlink"
