#!/usr/bin/env bash
# Runs a command while what the kind tier needs is made beside it, for
# `make test`: the kind toolchain (hack/kind-tools.sh), the node image and
# the cluster itself (hack/kind.sh up), in the background at a low priority.
# Warm the builds are cache hits (seconds); on a new machine they are ~15 min
# of Go builds and ~10 min of image builds that the local tiers would
# otherwise wait for at the end. nice'd, they take what the tests leave idle,
# and `make e2e-kind` later finds them built or waits on their locks.
#
# The cluster's own processes run in its node containers, which nice does not
# reach: they get a CPU weight of 64 against the tests' 1024 instead
# (NATSMESH_KIND_AHEAD_SHARES, cgroup cpu.shares), until the kind tier's own
# `up` gives them the default back. Made at full weight (session 6) its start
# (~113 CPU-s) and idling (~0.2 cores) slowed the local tiers beside it by
# more than the 79 s it saved.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
log="${NATSMESH_STATE:-$repo/.work}/kind-ahead.log"
mkdir -p "$(dirname "$log")"

# Only with an engine up (hack/with-docker.sh): without one the kind tier
# skips, and there is nothing to build ahead.
ahead=""
# The cluster the kind tier (tests/e2e/test_e2e_kind.py) uses.
cluster="${NATSMESH_KIND_CLUSTER:-natsmesh-e2e}"
made_ahead="${NATSMESH_STATE:-$repo/.work}/kind-$cluster.ahead"
if "$("$here/docker.sh" cli)" info >/dev/null 2>&1; then
  # In a session of its own, so that cleanup stops the whole group.
  setsid nice -n 15 env NATSMESH_KIND_CLUSTER="$cluster" NATSMESH_KIND_AHEAD_SHARES=64 \
    bash -c '"$1/kind-tools.sh" && "$1/kind.sh" up' _ "$here" >"$log" 2>&1 &
  ahead=$!
  echo "kind-ahead: building the kind toolchain, node image and cluster in the background (log: $log)" >&2
fi

started=$SECONDS
cleanup() {
  [[ -n "$ahead" ]] || return 0
  if kill -0 "$ahead" 2>/dev/null; then
    kill -- "-$ahead" 2>/dev/null || true
    wait "$ahead" 2>/dev/null || true
  fi
  echo "kind-ahead: background log ($((SECONDS - started))s since start), last lines:" >&2
  tail -n 3 "$log" | sed 's/^/kind-ahead:   /' >&2 || true
  # Made ahead and not deleted by the kind tier (a tier before it failed):
  # a cluster for one run is not left behind.
  if [[ -e "$made_ahead" ]]; then
    echo "kind-ahead: deleting the cluster $cluster made ahead" >&2
    NATSMESH_KIND_CLUSTER="$cluster" "$here/kind.sh" down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
"$@"
