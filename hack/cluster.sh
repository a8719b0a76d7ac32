#!/usr/bin/env bash
# A real, local Kubernetes control plane without Docker: kwokctl's binary
# runtime runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler
# and kwok-controller as processes built by hack/tools.sh. Two fake nodes
# (kwok) make scheduled pods Running.
#
#   hack/cluster.sh up     create (or reuse) the cluster, wait for Ready nodes
#   hack/cluster.sh down   delete the cluster and everything it started
#   hack/cluster.sh env    print exports: KUBECONFIG and PATH with the tools
#
# NATSMESH_CLUSTER names the cluster (default natsmesh); state lives under
# NATSMESH_STATE (default <repo>/.work/<cluster>).
#
# Two things differ from kwokctl's defaults, both for tests/e2e/podsim.py,
# which plays the kubelet (and kube-proxy) for emulated pods:
# * kube-apiserver gets HTTPS_PROXY=<state>/service-proxy: it reaches
#   webhooks named by a Service through podsim's CONNECT proxy, which routes
#   <svc>.<ns>.svc:<port> to the emulated pod behind it (nothing listens
#   there otherwise, and the call fails as it would with no endpoints);
# * kwok's stages are its defaults minus pod-complete, which would mark a
#   Job's pod Succeeded before anything ran; podsim runs it and reports.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
name="${NATSMESH_CLUSTER:-natsmesh}"
state="${NATSMESH_STATE:-$repo/.work}/$name"
kubeconfig="$state/kubeconfig"
export KWOK_WORKDIR="$state/kwok"

bins() { "$here/tools.sh" --print; }
tool_path() { bins | tr '\n' ':'; }
export PATH="$(tool_path)$PATH"

bin_of() {
  local b
  for d in $(bins); do
    if [[ -x "$d/$1" ]]; then echo "$d/$1"; return; fi
  done
  echo "cluster: $1 is not built; run hack/tools.sh first" >&2
  exit 1
}

nodes_yaml() {
  for i in 0 1; do
    cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/role: agent
    type: kwok
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
---
EOF
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# kwok's default stages of the pinned kwok module, without pod-complete.
kwok_stages() {
  local dir
  dir="$(cd "$here/tools/kwok" && go mod download -json sigs.k8s.io/kwok |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
           pod/fast/pod-ready pod/fast/pod-delete; do
    echo "---"
    cat "$dir/kustomize/stage/$f.yaml"
  done
}

kwokctl_config() {
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
componentsPatches:
  - name: kube-apiserver
    extraEnvs:
      - name: HTTPS_PROXY
        value: http://$1
      - name: NO_PROXY
        value: 127.0.0.1,localhost
EOF
  kwok_stages
}

up() {
  local start=$SECONDS
  mkdir -p "$state"
  if [[ -f "$kubeconfig" ]] && kubectl --kubeconfig "$kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    echo "cluster: $name already up"
  else
    # A stale cluster (processes gone after a reboot) is removed first.
    kwokctl delete cluster --name "$name" --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
    echo "127.0.0.1:$(free_port)" >"$state/service-proxy"
    kwokctl_config "$(cat "$state/service-proxy")" >"$state/kwokctl.yaml"
    kwokctl create cluster --name "$name" --runtime binary --config "$state/kwokctl.yaml" \
      --kube-apiserver-binary "$(bin_of kube-apiserver)" \
      --kube-controller-manager-binary "$(bin_of kube-controller-manager)" \
      --kube-scheduler-binary "$(bin_of kube-scheduler)" \
      --etcd-binary "$(bin_of etcd)" \
      --kwok-controller-binary "$(bin_of kwok)" \
      --kubeconfig "$kubeconfig" \
      --wait 120s --timeout 180s >"$state/create.log" 2>&1 || {
        echo "cluster: kwokctl create failed; log $state/create.log:" >&2
        tail -30 "$state/create.log" >&2
        exit 1
      }
  fi
  nodes_yaml | kubectl --kubeconfig "$kubeconfig" apply -f - >/dev/null
  kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready node --all --timeout=60s >/dev/null
  echo "cluster: $name up in $((SECONDS - start))s; kubeconfig $kubeconfig"
  kubectl --kubeconfig "$kubeconfig" get nodes
}

down() {
  kwokctl delete cluster --name "$name" --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
  rm -rf "$state"
  echo "cluster: $name down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env)
    echo "export KUBECONFIG=$kubeconfig"
    echo "export PATH=$(tool_path)\$PATH"
    echo "export NATSMESH_SERVICE_PROXY=$(cat "$state/service-proxy" 2>/dev/null)"
    ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
