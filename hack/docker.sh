#!/usr/bin/env bash
# A Docker engine for the real-pod tiers, from the distribution's packages.
#
#   hack/docker.sh up      install docker.io and mmdebstrap if missing, start
#                          dockerd if no engine answers (prints DOCKER=<cli>)
#   hack/docker.sh down    stop dockerd, only if `up` started it
#   hack/docker.sh cli     print the docker CLI to use
#
# Only what is missing is installed (`apt-get update` once, then
# `apt-get install docker.io mmdebstrap`); an engine that already answers is
# used as it is. A dockerd started here runs with the runtime wrapper
# hack/runc-capfilter as its default runtime, but only when this machine's
# capability bounding set lacks a capability the kernel knows: docker gives
# --privileged containers (kind's nodes) all of them and runc then fails with
# "unable to apply caps". The wrapper is copied into the cache so the engine
# does not depend on this checkout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}"
# shellcheck source=hack/lib/apt.sh
. "$here/lib/apt.sh"
state="$cache/docker"
pidfile="$state/dockerd.pid"      # present only while a dockerd started here runs
log="$state/dockerd.log"

# The CLI: Debian's own (20.10, same as the engine, BuildKit built in) when it
# is there; a newer CLI on PATH without the buildx plugin cannot build.
docker_cli() {
  if [[ -n "${DOCKER:-}" ]]; then echo "$DOCKER"
  elif [[ -x /usr/bin/docker ]]; then echo /usr/bin/docker
  else command -v docker || echo docker
  fi
}

ensure_packages() {
  local missing=()
  command -v dockerd >/dev/null || [[ -x /usr/sbin/dockerd ]] || missing+=(docker.io)
  [[ -x /usr/bin/docker ]] || command -v docker >/dev/null || missing+=(docker.io)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  # shellcheck disable=SC2207
  missing=($(printf '%s\n' "${missing[@]}" | sort -u))
  apt_install docker "${missing[@]}"
}

engine_answers() { "$(docker_cli)" info >/dev/null 2>&1; }

# Capabilities the kernel knows but this process may not hold.
caps_missing() {
  local last bnd full
  last="$(cat /proc/sys/kernel/cap_last_cap)"
  bnd=$((16#$(awk '/^CapBnd:/ {print $2}' /proc/self/status)))
  full=$(((1 << (last + 1)) - 1))
  [[ $((bnd & full)) -ne $full ]]
}

start_dockerd() {
  mkdir -p "$state"
  local args=(--pidfile "$pidfile")
  if caps_missing; then
    install -m 0755 "$here/runc-capfilter" "$state/runc-capfilter"
    args+=(--add-runtime "natsmesh-runc=$state/runc-capfilter" --default-runtime natsmesh-runc)
    echo "docker: capability bounding set is partial; default runtime = runc-capfilter"
  fi
  echo "docker: starting dockerd (log: $log)"
  setsid nohup dockerd "${args[@]}" >"$log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    if engine_answers; then echo "docker: engine up"; return 0; fi
    sleep 1
  done
  echo "docker: dockerd did not answer within 60s; last log lines:" >&2
  tail -20 "$log" >&2
  exit 1
}

up() {
  ensure_packages
  if engine_answers; then
    echo "docker: engine already running"
  else
    start_dockerd
  fi
  echo "DOCKER=$(docker_cli)"
}

down() {
  if [[ ! -f "$pidfile" ]]; then
    echo "docker: no dockerd started by us"
    return 0
  fi
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "docker: stopping dockerd $pid"
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$pidfile"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  cli) docker_cli ;;
  *) echo "usage: $0 up|down|cli" >&2; exit 2 ;;
esac
