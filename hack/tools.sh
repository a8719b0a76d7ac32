#!/usr/bin/env bash
# Builds the local control-plane and NATS tools from the Go module proxy into
# a versioned cache, so tests and the demo run without Docker or downloads of
# prebuilt binaries.
#
#   hack/tools.sh            build what is missing, print the bin directory
#   hack/tools.sh --print    only print the bin directory
#
# Each tool set has its own module under hack/tools/<set>/ (go.mod + go.sum
# pin every version); a set is rebuilt only when its go.mod/go.sum changed,
# because the cache key is a hash of those two files.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib/tools.sh
. "$here/lib/tools.sh"

if [[ "${1:-}" == "--print" ]]; then
  for set in k8s etcd kwok helm natscli prometheus jaeger; do bin_dir_of "$set"; done
  exit 0
fi

# The host commands the tests call beside the built tools: Debian's curl
# (tests/integration/stream sends uploads and reads downloads with it).
# shellcheck source=hack/lib/apt.sh
. "$here/lib/apt.sh"
command -v curl >/dev/null || apt_install tools curl

lock_cache tools
export GOFLAGS="-mod=readonly -trimpath"
export CGO_ENABLED=0

build_set() {
  local set="$1"; shift
  local out; out="$(bin_dir_of "$set")"
  local ldflags="-s -w ${LDFLAGS_EXTRA:-}"
  local tags="${TAGS_EXTRA:-}"
  if [[ -f "$out/.complete" ]]; then
    echo "tools: $set cached in $out"
    return
  fi
  echo "tools: building $set ($*) into $out"
  local start=$SECONDS
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  (cd "$here/tools/$set" && go build -tags "$tags" -ldflags "$ldflags" -o "$out.tmp/" "$@")
  touch "$out.tmp/.complete"
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "tools: built $set in $((SECONDS - start))s"
}

total_start=$SECONDS
build_set etcd go.etcd.io/etcd/server/v3
mv_etcd() {
  # The etcd server module's main package builds as "server"; kwokctl wants "etcd".
  local d; d="$(bin_dir_of etcd)"
  if [[ -f "$d/server" ]]; then mv "$d/server" "$d/etcd"; fi
}
mv_etcd
build_set kwok sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl
build_set helm helm.sh/helm/v3/cmd/helm
build_set natscli github.com/nats-io/natscli/nats
# Prometheus for the dashboard/alert tests: remove_all_sd keeps only the
# static, file and http discovery (no cloud SDKs), and
# without the builtinassets tag there is no web UI, only the API.
TAGS_EXTRA="remove_all_sd" build_set prometheus \
  github.com/prometheus/prometheus/cmd/prometheus \
  github.com/prometheus/prometheus/cmd/promtool
# Jaeger v2 (an OpenTelemetry collector with Jaeger's storage and query
# API; no UI assets): the OTLP receiver the tracing tests export spans to.
build_set jaeger github.com/jaegertracing/jaeger/cmd/jaeger

LDFLAGS_EXTRA="$(k8s_version_ldflags)" build_set k8s \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl

echo "tools: all present after $((SECONDS - total_start))s"
for set in k8s etcd kwok helm natscli prometheus jaeger; do bin_dir_of "$set"; done
