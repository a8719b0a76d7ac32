#!/usr/bin/env bash
# The natsmesh demo on the local control plane (no Docker):
#
#   hack/demo.sh up     cluster + operator-mode NATS + operator + the shop example
#   hack/demo.sh down   stop everything the demo started and remove its state
#
# Everything runs as local processes: kube-apiserver & co. via kwokctl,
# nats-server (operator mode, JetStream), and `natsmesh operator`, which
# registers its webhooks with the API server at https://127.0.0.1:<port>.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
state="$repo/.work/demo-run"
venv="${VENV:-$repo/.venv}"
export NATSMESH_CLUSTER="${NATSMESH_CLUSTER:-natsmesh}"
nats_port="${DEMO_NATS_PORT:-14222}"
webhook_port="${DEMO_WEBHOOK_PORT:-19443}"
metrics_port="${DEMO_METRICS_PORT:-18080}"
system_ns="natsmesh-system"
shop_ns="shop"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

kubectl_() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }

wait_http() {
  local url="$1" what="$2"
  for _ in $(seq 1 100); do
    if curl -fsk "$url" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: $what did not come up ($url); see $state/*.log" >&2
  exit 1
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

up() {
  local start=$SECONDS
  mkdir -p "$state"
  say "tools and the local control plane"
  "$here/venv.sh"
  "$here/tools.sh" | tail -1
  "$here/cluster.sh" up
  eval "$("$here/cluster.sh" env)"

  say "NATS in operator mode (bootstrap: operator key, system account, full resolver)"
  "$venv/bin/natsmesh" bootstrap --out "$state/bootstrap" --resolver-dir "$state/jwt" \
    --secret natsmesh-nats-bootstrap --namespace "$system_ns" >"$state/bootstrap-secret.json"
  cat >"$state/nats.conf" <<EOF
listen: 127.0.0.1:$nats_port
http: 127.0.0.1:$((nats_port + 4000))
server_name: natsmesh-demo
jetstream { store_dir: "$state/jetstream" }
include ./bootstrap/resolver.conf
EOF
  start_bg nats "$venv/bin/nats-server" -c "$state/nats.conf"
  wait_http "http://127.0.0.1:$((nats_port + 4000))/healthz" "nats-server"

  say "CRDs, the operator namespace and the bootstrap Secret"
  kubectl_ apply --server-side -f "$repo/crds/" >/dev/null
  kubectl_ wait --for=condition=Established crd/natsservices.natsmesh.io crd/natsroutes.natsmesh.io >/dev/null
  kubectl_ create namespace "$system_ns" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ apply -f "$state/bootstrap-secret.json" >/dev/null

  say "the operator (kopf) with its admission webhooks"
  "$venv/bin/python" -c "from pathlib import Path; from natsmesh_operator.webhook.tls import make_ca_and_cert; make_ca_and_cert(Path('$state/tls'), ['127.0.0.1'])"
  NATSMESH_NATS_URL="nats://127.0.0.1:$nats_port" \
  NATSMESH_OPERATOR_NAMESPACE="$system_ns" \
  NATSMESH_PEERING=standalone \
  NATSMESH_WEBHOOK_ADDR=127.0.0.1 \
  NATSMESH_WEBHOOK_PORT="$webhook_port" \
  NATSMESH_WEBHOOK_CERT_DIR="$state/tls" \
  NATSMESH_WEBHOOK_SELF_REGISTER_URL="https://127.0.0.1:$webhook_port" \
  NATSMESH_WEBHOOK_FAILURE_POLICY=Ignore \
  NATSMESH_METRICS_PORT="$metrics_port" \
  NATSMESH_SIDECAR_IMAGE=natsmesh/sidecar:0.1.0 \
  KUBECONFIG="$KUBECONFIG" \
    start_bg operator "$venv/bin/natsmesh" operator
  wait_http "http://127.0.0.1:$metrics_port/healthz" "the operator"

  say "the shop: gateway, orders (v1 + v2 canary), payments, inventory"
  kubectl_ create namespace "$shop_ns" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
  kubectl_ label namespace "$shop_ns" natsmesh.io/inject=enabled --overwrite >/dev/null
  kubectl_ apply -n "$shop_ns" -f "$repo/examples/shop/"
  kubectl_ wait -n "$shop_ns" --for=condition=Ready natsservice --all --timeout=60s >/dev/null
  kubectl_ get natsmesh -n "$shop_ns"

  say "what NATS now holds for the shop"
  kubectl_ get secrets -n "$shop_ns" -l natsmesh.io/creds=true
  echo "(each Secret is a NATS user whose JWT allows exactly what allowedCallers and events say)"

  say "a workload picks up the sidecar (mutating webhook, native sidecar)"
  if [[ -d "$repo/examples/shop/apps" ]]; then
    kubectl_ apply -n "$shop_ns" -f "$repo/examples/shop/apps/" >/dev/null
  fi
  kubectl_ get pods -n "$shop_ns" \
    -o custom-columns='POD:.metadata.name,STATUS:.status.phase,SIDECAR:.spec.initContainers[0].name' \
    2>/dev/null || true

  if [[ -f "$repo/tests/e2e/demo_traffic.py" ]]; then
    say "traffic through the mesh (pods emulated as local processes)"
    KUBECONFIG="$KUBECONFIG" "$venv/bin/python" "$repo/tests/e2e/demo_traffic.py" --namespace "$shop_ns"
  fi

  say "done in $((SECONDS - start))s"
  cat <<EOF
  kubectl:    export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
              kubectl get natsmesh -A; kubectl describe nsvc -n $shop_ns orders
  metrics:    curl -s http://127.0.0.1:$metrics_port/metrics | grep natsmesh_operator
  NATS:       nats --server nats://127.0.0.1:$nats_port --creds $state/bootstrap/sys.creds server list
  logs:       $state/operator.log, $state/nats.log
  clean up:   hack/demo.sh down
EOF
}

down() {
  for name in operator nats; do
    if [[ -f "$state/$name.pid" ]]; then
      kill "$(cat "$state/$name.pid")" 2>/dev/null || true
    fi
  done
  if [[ -f "$state/pods.pid" ]]; then kill "$(cat "$state/pods.pid")" 2>/dev/null || true; fi
  sleep 1
  "$here/cluster.sh" down
  rm -rf "$state"
  echo "demo: down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
