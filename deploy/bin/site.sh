#!/usr/bin/env bash
# A hospital's node: preflight (`fedpath site check`), then the SuperNode, which connects outward to the
# coordinator over TLS, authenticates with the site's key, and runs only apps signed with the consortium's
# app-signing key (federation.toml's app-signers). It opens no port to the network (its local
# runtime API listens on 127.0.0.1 only). Run by the site container, by fedpath-site.service and by the tests.
#
# Environment (defaults in brackets):
#   FEDPATH_SITE        this site's name, as in `deploy init --sites` and the manifest      (required)
#   FEDPATH_SUPERLINK   the coordinator's HOST:PORT                                         (required)
#   FEDPATH_KEYS        folder with ca.crt, federation.toml, $FEDPATH_SITE.key: sites/SITE/  [/etc/fedpath]
#   FEDPATH_MANIFEST    the site's cohort manifest (its feature files stay where they are)   [/data/manifest.csv]
#   FEDPATH_STATE       folder for Flower's app cache                                        [/var/lib/fedpath]
#   FEDPATH_NODE_PORT   local runtime API port (127.0.0.1)                                   [9094]
#   FEDPATH_PREFLIGHT   1 = run `fedpath site check` first and stop when it fails            [1]
#   FEDPATH_POLICY      the site's privacy policy, `fedpath site start` options, e.g.
#                       "--policy-require-dp --privacy-budget 4 --policy-min-noise 0.8"       []
# The site's differential-privacy ledger (ε spent over all runs) is kept in $FEDPATH_STATE/privacy/, so the
# data folder can be mounted read-only.
set -euo pipefail

: "${FEDPATH_SITE:?set FEDPATH_SITE to this site's name}"
: "${FEDPATH_SUPERLINK:?set FEDPATH_SUPERLINK to the coordinator's HOST:PORT}"
keys="${FEDPATH_KEYS:-/etc/fedpath}"
state="${FEDPATH_STATE:-/var/lib/fedpath}"
manifest="${FEDPATH_MANIFEST:-/data/manifest.csv}"
key="$keys/$FEDPATH_SITE.key"
mkdir -p "$state"

if [[ "${FEDPATH_PREFLIGHT:-1}" == "1" ]]; then
    if ! fedpath site check --federation "$keys/federation.toml" --superlink "$FEDPATH_SUPERLINK" \
        --manifest "$manifest" --site "$FEDPATH_SITE" --auth-key "$key" \
        --privacy-ledger "$state/privacy/$FEDPATH_SITE.json"; then
        echo "site.sh: preflight failed (see above); not joining" >&2
        exit 1  # restarted later by systemd/compose: the coordinator may just be down
    fi
fi

exec fedpath site start --superlink "$FEDPATH_SUPERLINK" --root-certificates "$keys/ca.crt" \
    --auth-key "$key" --federation "$keys/federation.toml" --manifest "$manifest" --site "$FEDPATH_SITE" \
    --port "${FEDPATH_NODE_PORT:-9094}" --flwr-home "$state/supernode" \
    --privacy-ledger "$state/privacy/$FEDPATH_SITE.json" ${FEDPATH_POLICY:-}
