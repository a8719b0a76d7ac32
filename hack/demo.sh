#!/usr/bin/env bash
# The natsmesh demo on the local control plane (no Docker):
#
#   hack/demo.sh up         cluster + `helm install` of the chart + the shop example
#   hack/demo.sh down       stop everything the demo started and remove its state
#   hack/demo.sh kind-up    the same on kind: real kubelets, images built here
#   hack/demo.sh kind-down  delete the demo's kind cluster
#
# The cluster is real (kube-apiserver & co. via kwokctl); its nodes are kwok's,
# which run nothing. So the demo starts the emulator that plays their kubelet
# and kube-proxy (python -m tests.e2e.local, see tests/e2e/podsim.py): the pods
# that land on the nodes -- the chart's bootstrap Job, NATS and two operator
# replicas, then the shop's apps with their injected sidecars -- run here as
# processes, with the env, args, volumes and service-account tokens their pod
# specs name. Everything else is what you would type on a real cluster.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
state="$repo/.work/demo-run"
venv="${VENV:-$repo/.venv}"
export NATSMESH_CLUSTER="${NATSMESH_CLUSTER:-natsmesh}"
system_ns="natsmesh-system"
shop_ns="shop"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '  $ %s\n' "$*"; "$@"; }
# guarded CMD...: show and run CMD, but stop it (and the demo) the moment an
# emulated pod cannot start or the emulator is gone, with the pod's error on
# screen: such a pod never gets Ready and helm or kubectl would wait in silence.
guarded() {
  printf '  $ %s\n' "$*"
  "$venv/bin/python" "$repo/tests/e2e/demo_traffic.py" --pods "$state/pods/pods.json" \
    --emulator-pid "$(cat "$state/nodes.pid")" --emulator-log "$state/nodes.log" guard -- "$@"
}

start_bg() {
  # start_bg NAME CMD...: a background process with a pid file and a log.
  local name="$1"; shift
  if [[ -f "$state/$name.pid" ]] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
    return
  fi
  nohup "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

# CRDs applied with kubectl before (by tests on this cluster) become the release's.
adopt_crds() {
  local crd
  for crd in natsservices.natsmesh.io natsroutes.natsmesh.io; do
    if kubectl get crd "$crd" >/dev/null 2>&1; then
      kubectl label --overwrite crd "$crd" app.kubernetes.io/managed-by=Helm >/dev/null
      kubectl annotate --overwrite crd "$crd" meta.helm.sh/release-name=natsmesh \
        meta.helm.sh/release-namespace="$system_ns" >/dev/null
    fi
  done
}

# shop WRAP: the shop's NatsServices, then its workloads; WRAP shows and runs
# the waits (the emulated flavour guards them against a pod that cannot start).
shop() {
  local wrap="$1"
  say "the shop: gateway, orders (v1 + v2 canary), payments, inventory"
  kubectl create namespace "$shop_ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  show kubectl label namespace "$shop_ns" natsmesh.io/inject=enabled --overwrite
  show kubectl apply -n "$shop_ns" -f "$repo/examples/shop/"
  "$wrap" kubectl wait -n "$shop_ns" --for=condition=Ready natsservice,natsroute --all \
    --timeout=60s >/dev/null
  show kubectl get natsmesh -n "$shop_ns"

  say "what NATS now holds for the shop"
  show kubectl get secrets -n "$shop_ns" -l natsmesh.io/creds=true
  echo "  (each Secret is a NATS user whose JWT allows exactly what allowedCallers and events say)"

  say "the workloads get the sidecar (mutating webhook, native sidecar)"
  show kubectl apply -n "$shop_ns" -f "$repo/examples/shop/apps/"
}

up() {
  local start=$SECONDS
  mkdir -p "$state"
  say "tools and the local control plane"
  "$here/venv.sh"
  "$here/tools.sh" | tail -1
  "$here/cluster.sh" up
  eval "$("$here/cluster.sh" env)"
  export KUBECONFIG

  say "the kwok nodes' pods run as local processes (log: $state/nodes.log)"
  start_bg nodes "$venv/bin/python" -m tests.e2e.local --kubeconfig "$KUBECONFIG" \
    --workdir "$state/pods" "$system_ns" "$shop_ns"

  say "helm install: operator (2 replicas, peering), webhooks, NATS, bootstrap hook"
  adopt_crds
  # One NATS server without a PVC: kwok has no volume provisioner.
  guarded helm upgrade --install natsmesh "$repo/charts/natsmesh" \
    --namespace "$system_ns" --create-namespace \
    --set nats.replicas=1 --set nats.jetstream.persistence.enabled=false | sed -n '1,6p'
  "$venv/bin/python" "$repo/tests/e2e/demo_traffic.py" --pods "$state/pods/pods.json" \
    wait "$system_ns"

  shop guarded
  "$venv/bin/python" "$repo/tests/e2e/demo_traffic.py" --pods "$state/pods/pods.json" \
    traffic "$shop_ns"
  kubectl get pods -n "$shop_ns" \
    -o custom-columns='POD:.metadata.name,STATUS:.status.phase,SIDECAR:.spec.initContainers[0].name'

  say "done in $((SECONDS - start))s"
  cat <<EOF
  shell:      eval "\$(hack/cluster.sh env)"     # KUBECONFIG, and kubectl/helm/nats on PATH
              kubectl get natsmesh -A; kubectl describe nsvc -n $shop_ns orders
              helm status natsmesh -n $system_ns
              (ENDPOINTS counts live sidecars every 30 s)
  pods:       $state/pods/<namespace>/<pod>/<container>.log (ports in $state/pods/pods.json)
  clean up:   make demo-down
EOF
}

down() {
  if [[ -f "$state/nodes.pid" ]]; then
    kill "$(cat "$state/nodes.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$(cat "$state/nodes.pid")" 2>/dev/null || break
      sleep 0.2
    done
  fi
  "$here/cluster.sh" down
  rm -rf "$state"
  echo "demo: down"
}

# The demo on kind: hack/kind.sh's cluster (NetworkPolicies enforced, a
# default StorageClass), the images built here, the same steps and output.
kind_up() {
  local start=$SECONDS
  export NATSMESH_KIND_CLUSTER="${NATSMESH_KIND_CLUSTER:-natsmesh-demo}"
  say "a kind cluster: real kubelets, built offline (hack/kind.sh up)"
  "$here/venv.sh"
  "$here/kind.sh" up 2>&1 | grep -E '^kind: (cluster|node image|ready)' || true
  eval "$("$here/kind.sh" env)"
  export KUBECONFIG PATH

  say "helm install: operator (2 replicas, peering), webhooks, NATS, bootstrap hook"
  local images; mapfile -t images < <("$here/images.sh" --print)
  local nats; nats="$("$here/kind.sh" nats-image)"
  show helm upgrade --install natsmesh "$repo/charts/natsmesh" \
    --namespace "$system_ns" --create-namespace \
    --set "image.operator.repository=${images[3]%:*},image.operator.tag=${images[3]##*:}" \
    --set "image.sidecar.repository=${images[2]%:*},image.sidecar.tag=${images[2]##*:}" \
    --set "nats.image.repository=${nats%:*},nats.image.tag=${nats##*:}" \
    --set image.operator.pullPolicy=Never,image.sidecar.pullPolicy=Never \
    --set nats.image.pullPolicy=Never,nats.replicas=1,nats.jetstream.persistence.size=2Gi \
    --set nats.jetstream.maxFileStore=2Gi --wait --timeout 5m | sed -n '1,6p'
  kubectl get pods -n "$system_ns" | sed 's/^/  /'

  shop show
  local d
  for d in $(kubectl get deploy -n "$shop_ns" -o name); do
    kubectl rollout status -n "$shop_ns" "$d" --timeout=180s >/dev/null
  done
  "$venv/bin/python" "$repo/tests/e2e/demo_traffic.py" kind-traffic "$shop_ns"
  kubectl get pods -n "$shop_ns" \
    -o custom-columns='POD:.metadata.name,STATUS:.status.phase,SIDECAR:.spec.initContainers[0].name'

  say "done in $((SECONDS - start))s"
  cat <<EOF
  shell:      eval "\$(NATSMESH_KIND_CLUSTER=$NATSMESH_KIND_CLUSTER hack/kind.sh env)"
              kubectl get natsmesh -A; kubectl describe nsvc -n $shop_ns orders
              kubectl get networkpolicy -A    # enforced here (kube-router)
  clean up:   make demo-kind-down
EOF
}

kind_down() {
  NATSMESH_KIND_CLUSTER="${NATSMESH_KIND_CLUSTER:-natsmesh-demo}" "$here/kind.sh" down
  echo "demo: kind cluster deleted"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  kind-up) kind_up ;;
  kind-down) kind_down ;;
  *) echo "usage: $0 up|down|kind-up|kind-down" >&2; exit 2 ;;
esac
