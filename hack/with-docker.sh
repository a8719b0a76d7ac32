#!/usr/bin/env bash
# Runs a command with a Docker engine up (hack/docker.sh up: Debian's docker.io
# and mmdebstrap installed if missing, dockerd started if no engine answers).
# A dockerd this script started is stopped afterwards (also on failure); one
# that was already running is left as it was.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
docker="$("$here/docker.sh" cli)"
if "$docker" info >/dev/null 2>&1; then
  exec "$@"
fi
if ! "$here/docker.sh" up; then
  # No engine and none can be had (not root, no package source): the Docker
  # tiers skip with that reason; the rest still runs.
  echo "with-docker: no Docker engine; tests that need one will skip" >&2
  exec "$@"
fi
cleanup() { "$here/docker.sh" down || true; }
trap cleanup EXIT
"$@"
