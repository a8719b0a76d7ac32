#!/usr/bin/env bash
# Runs a command while a kind cluster is created beside it (hack/kind.sh up in
# the background), for `make test`: the cluster's start (~75 s warm: node
# containers, kubeadm, the pod network, images loaded) is mostly waiting on
# containerd and kubelets, so it overlaps the local tiers, and the kind tier
# that comes after finds its cluster ready. Only the cluster is made ahead; the
# chart and the shop are still installed by the kind tier itself (pods started
# beside the CPU-bound local tiers made startup-order checks flaky:
# docs/architecture.md, "CI, cold and warm").
#
# The e2e fixture's own `hack/kind.sh up` waits on the same lock, and with
# NATSMESH_KIND_DISPOSABLE=1 deletes the cluster when done; whatever is left
# (the command failed before the kind tier) is deleted here on exit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export NATSMESH_KIND_CLUSTER="${NATSMESH_KIND_CLUSTER:-natsmesh-e2e}"
export NATSMESH_KIND_DISPOSABLE=1
log="${NATSMESH_STATE:-$repo/.work}/kind-ahead-$NATSMESH_KIND_CLUSTER.log"
mkdir -p "$(dirname "$log")"

# Only with an engine up (hack/with-docker.sh): without one the kind tier
# skips, and there is nothing to make ahead.
if "$("$here/docker.sh" cli)" info >/dev/null 2>&1; then
  # In a session of its own, so that cleanup stops the whole group (kind,
  # docker and kubectl children included) and the lock goes with it.
  setsid "$here/kind.sh" up >"$log" 2>&1 &
  ahead=$!
  echo "kind-ahead: creating kind cluster $NATSMESH_KIND_CLUSTER in the background (log: $log)" >&2
else
  ahead=""
fi

cleanup() {
  if [[ -n "$ahead" ]] && kill -0 "$ahead" 2>/dev/null; then
    kill -- "-$ahead" 2>/dev/null || true
    wait "$ahead" 2>/dev/null || true
  fi
  NATSMESH_KIND_CLUSTER="$NATSMESH_KIND_CLUSTER" "$here/kind.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$@"
