#!/usr/bin/env bash
# The coordinator's SuperLink: TLS with the consortium's certificate, site authentication, a state database.
# The one process that listens on the network; ServerApps run from superexec.sh so that a run survives a
# restart of this process. Run by the coordinator container, by fedpath-coordinator.service and by the tests.
#
# Environment (defaults in brackets):
#   FEDPATH_KEYS   folder with ca.crt, server.pem, server.key: deploy init's coordinator/   [/etc/fedpath]
#   FEDPATH_STATE  folder kept across restarts: state.db (runs, registrations), logs        [/var/lib/fedpath]
#   FEDPATH_HOST   interface to listen on                                                   [0.0.0.0]
#   FEDPATH_PORT   the one TCP port the sites connect to                                    [8000]
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
    --host "${FEDPATH_HOST:-0.0.0.0}" --port "${FEDPATH_PORT:-8000}" \
    --tls "$keys/ca.crt" "$keys/server.pem" "$keys/server.key" \
    --enable-supernode-auth --database "$state/state.db" \
    --isolation process --flwr-home "$state/superlink"
