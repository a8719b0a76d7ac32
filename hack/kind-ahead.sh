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
  # The kind toolchain first (seconds warm; on a new machine ~15 min of Go
  # builds, which the local tiers would otherwise wait for at the end), at a
  # low priority: the tests beside it keep the cores they ask for, the
  # builds take what the tests leave idle (most of it: the tiers wait more
  # than they compute). `make e2e-kind` asks for the same tools later and
  # waits on the build's lock.
  setsid nice -n 15 bash -c '"$1/kind-tools.sh" && "$1/kind.sh" up' _ "$here" >"$log" 2>&1 &
  ahead=$!
  echo "kind-ahead: creating kind cluster $NATSMESH_KIND_CLUSTER in the background (log: $log)" >&2
else
  ahead=""
fi

started=$SECONDS
cleanup() {
  if [[ -n "$ahead" ]]; then
    # Where the cluster's start went (the log stays in .work/ for a closer look).
    echo "kind-ahead: background log ($((SECONDS - started))s since start), last lines:" >&2
    tail -n 5 "$log" | sed 's/^/kind-ahead:   /' >&2 || true
  fi
  if [[ -n "$ahead" ]] && kill -0 "$ahead" 2>/dev/null; then
    kill -- "-$ahead" 2>/dev/null || true
    wait "$ahead" 2>/dev/null || true
  fi
  NATSMESH_KIND_CLUSTER="$NATSMESH_KIND_CLUSTER" "$here/kind.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$@"
