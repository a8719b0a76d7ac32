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
# And one for the chart's webhook.clientAuth (openssl, well under a second):
# * kube-apiserver gets --admission-control-config-file: for Service-bound
#   webhooks (*.svc) it presents a client certificate from a CA made here,
#   under <state>/webhook-client (ca.crt; apiserver.crt/.key, CN
#   kube-apiserver-webhook-client; other.crt/.key, same CA, another CN, for
#   tests to play an impostor; the CA key is deleted). A webhook that asks for
#   no client certificate never sees it, so the default install is unchanged.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
name="${NATSMESH_CLUSTER:-natsmesh}"
state="${NATSMESH_STATE:-$repo/.work}/$name"
kubeconfig="$state/kubeconfig"
cache="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}"
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

# The client CA and certificates under $1 (see the header).
webhook_client_certs() {
  local dir="$1" name cn
  command -v openssl >/dev/null || {
    echo "cluster: openssl is needed for the API server's webhook client certificate" >&2
    exit 1
  }
  mkdir -p "$dir"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$dir/ca.key" -days 3650 -subj "/CN=natsmesh-local-webhook-client-ca" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.crt"
  for name in apiserver other; do
    cn=kube-apiserver-webhook-client
    [[ $name == other ]] && cn=system:node:kwok-node-0
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$name.key" 2>/dev/null
    openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" |
      openssl x509 -req -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -days 3650 \
        -set_serial "0x$(openssl rand -hex 12)" -out "$dir/$name.crt" \
        -extfile <(printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n') \
        2>/dev/null
  done
  rm -f "$dir/ca.key"
  chmod 600 "$dir"/*.key
}

# kube-apiserver's admission configuration: both webhook plugins present
# apiserver.crt to every webhook called through a Service (*.svc).
admission_config() {
  cat >"$state/webhook-kubeconfig.yaml" <<EOF
apiVersion: v1
kind: Config
users:
  - name: "*.svc"
    user:
      client-certificate: $state/webhook-client/apiserver.crt
      client-key: $state/webhook-client/apiserver.key
EOF
  cat <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
  - name: MutatingAdmissionWebhook
    configuration:
      apiVersion: apiserver.config.k8s.io/v1
      kind: WebhookAdmissionConfiguration
      kubeConfigFile: $state/webhook-kubeconfig.yaml
  - name: ValidatingAdmissionWebhook
    configuration:
      apiVersion: apiserver.config.k8s.io/v1
      kind: WebhookAdmissionConfiguration
      kubeConfigFile: $state/webhook-kubeconfig.yaml
EOF
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
    extraArgs:
      - key: admission-control-config-file
        value: $2
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
    rm -rf "$state/webhook-client"
    webhook_client_certs "$state/webhook-client"
    admission_config >"$state/admission.yaml"
    kwokctl_config "$(cat "$state/service-proxy")" "$state/admission.yaml" >"$state/kwokctl.yaml"
    # kwokctl takes its components' ports by probing for free ones: two
    # clusters created at once (the integration tier's two halves) were
    # handed the same apiserver port. One create at a time on this machine
    # (-o: the lock is not inherited by the servers kwokctl leaves running).
    mkdir -p "$cache"
    flock -o "$cache/kwokctl-create.lock" \
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
  # kwok marks the nodes Ready within seconds; on a box loaded by other work
  # it once took over a minute (a CI run failed on the 60 s this was).
  kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready node --all --timeout=180s >/dev/null
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
