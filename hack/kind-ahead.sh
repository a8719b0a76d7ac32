#!/usr/bin/env bash
# Runs a command while what the kind tier needs is built beside it, for
# `make test`: the kind toolchain (hack/kind-tools.sh) and the node image
# (hack/kind.sh image), in the background at a low priority. Warm both are
# cache hits (seconds); on a new machine they are ~15 min of Go builds and
# ~10 min of image builds that the local tiers would otherwise wait for at the
# end. nice'd, they take what the tests leave idle (the tiers wait more than
# they compute), and `make e2e-kind` later finds them built or waits on their
# locks.
#
# The cluster itself is not made ahead (measured, docs/architecture.md "CI,
# cold and warm"): its start costs ~113 CPU-s and an idle cluster ~0.2 cores,
# which slowed the local tiers beside it by more than the 79 s it saved.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
log="${NATSMESH_STATE:-$repo/.work}/kind-ahead.log"
mkdir -p "$(dirname "$log")"

# Only with an engine up (hack/with-docker.sh): without one the kind tier
# skips, and there is nothing to build ahead.
ahead=""
if "$("$here/docker.sh" cli)" info >/dev/null 2>&1; then
  # In a session of its own, so that cleanup stops the whole group.
  setsid nice -n 15 bash -c '"$1/kind-tools.sh" && "$1/kind.sh" image' _ "$here" >"$log" 2>&1 &
  ahead=$!
  echo "kind-ahead: building the kind toolchain and node image in the background (log: $log)" >&2
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
}
trap cleanup EXIT
"$@"
