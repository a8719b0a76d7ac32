#!/usr/bin/env bash
# Runs a command with NATSMESH_KUBECONFIG pointing at a local control plane.
# Reuses a running cluster given in NATSMESH_KUBECONFIG; otherwise starts the
# cluster "natsmesh-test" and removes it afterwards (also on failure).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${NATSMESH_KUBECONFIG:-}" && -f "$NATSMESH_KUBECONFIG" ]]; then
  exec "$@"
fi
export NATSMESH_CLUSTER="${NATSMESH_TEST_CLUSTER:-natsmesh-test}"
cleanup() { "$here/cluster.sh" down >/dev/null 2>&1 || true; }
trap cleanup EXIT
"$here/cluster.sh" up
eval "$("$here/cluster.sh" env)"
export NATSMESH_KUBECONFIG="$KUBECONFIG"
"$@"
