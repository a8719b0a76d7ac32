#!/usr/bin/env bash
# A kind cluster with real kubelets, built and run with no image registry.
#
#   hack/kind.sh image   build (or find) the node image, print its name
#   hack/kind.sh up      image, then create the cluster (control plane + worker),
#                        its pod network, and load natsmesh's images into it
#   hack/kind.sh down    delete the cluster (dockerd keeps running: make docker-down)
#   hack/kind.sh env     print exports: KUBECONFIG, PATH with kind/kubectl/helm
#   hack/kind.sh nats-image  the NATS image up loads (for helm's nats.image.*)
#
# What `kind build node-image` would download is built here instead
# (docs/architecture.md, "Real pods on kind"):
# * binaries from the Go module proxy: hack/tools.sh (kube-apiserver,
#   kube-controller-manager, kube-scheduler, kubectl, etcd) and
#   hack/kind-tools.sh (kubelet, kubeadm, kube-proxy, kind, containerd v2,
#   runc, CNI plugins, CoreDNS, pause);
# * the component images, tagged exactly as `kubeadm config images list`
#   prints them: static binaries on an empty image, kube-proxy on a Debian
#   image with iptables and nftables;
# * the node image: hack/kind/node.Dockerfile over a mmdebstrap Debian with
#   systemd, with kind's own base files read from the kind module in the Go
#   module cache; the component images imported into its containerd
#   (`ctr -n k8s.io images import`), then `docker commit`.
# `kind create cluster --image <that>` then pulls nothing. kind's default CNI
# (kindnetd) is not available, so the cluster is created without one and
# this script installs a plain one: the CNI `ptp` plugin with host-local IPAM
# on each node's podCIDR, and a route per other node's podCIDR. On top:
# * kube-router's firewall (hack/kind/kube-router.yaml) enforces
#   NetworkPolicies;
# * rancher's local-path-provisioner (hack/kind/local-path.yaml) is the
#   default StorageClass "standard";
# both built by hack/kind-tools.sh onto the cluster's Debian base, imported
# into the node image with the chart's NATS image, and applied on every `up`.
#
# Everything is cached by content: the binaries under ~/.cache/natsmesh/bin,
# the root file systems under ~/.cache/natsmesh/images, the images in Docker
# (natsmesh/kind-node:<k8s version>-<key>, key = hash of every input).
set -euo pipefail
# A failure inside $(...) stops the function that ran it, not only the
# substitution (a failed base build once surfaced as Docker's "FROM requires
# either one or three arguments").
shopt -s inherit_errexit

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}"
name="${NATSMESH_KIND_CLUSTER:-natsmesh}"
state="${NATSMESH_STATE:-$repo/.work}/kind-$name"
kubeconfig="$state/kubeconfig"
k8s_version="$(awk -F'"' '/^k8s_version=/ {print $2}' "$here/lib/tools.sh")"
NODE_OS_PACKAGES=systemd,dbus,jq,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,procps,bash,pigz,socat,ebtables
# One Debian base for every image in the cluster that is more than a static
# binary: kube-proxy's iptables, nftables and conntrack, kube-router's
# iptables and ipset, a shell for local-path's helper pods, and sh + wget for
# the chart's NATS probes (exec probes against the loopback-only monitoring
# port). One base is one download from the Debian mirror, made while the node
# image is built (hack/kind-ahead.sh): `up` only finds it.
CLUSTER_OS_PACKAGES=iptables,nftables,conntrack,ipset,wget

log() { echo "kind: $*" >&2; }

# What an interrupted node-image build leaves behind.
CLEANUP_DIR="" CLEANUP_CONTAINER=""
cleanup() {
  [[ -z "$CLEANUP_DIR" ]] || rm -rf "$CLEANUP_DIR"
  [[ -z "$CLEANUP_CONTAINER" ]] || "$DOCKER" rm -f -v "$CLEANUP_CONTAINER" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# The tools' directories, asked once per run (here, not in bin_of: that runs
# in $(...) subshells): each ask hashes the tools' sources, and bin_of is
# called ~25 times by a warm `up`.
_bin_dirs="$("$here/tools.sh" --print; "$here/kind-tools.sh" --print)"
all_bin_dirs() { echo "$_bin_dirs"; }
bin_of() {
  local d
  for d in $_bin_dirs; do
    if [[ -x "$d/$1" ]]; then echo "$d/$1"; return; fi
  done
  log "$1 is not built (hack/tools.sh, hack/kind-tools.sh)"
  exit 1
}

docker_up() { eval "$("$here/docker.sh" up | grep '^DOCKER=')"; export DOCKER; }

kind_module_dir() {
  local v; v="$(awk '$1 == "sigs.k8s.io/kind" {print $2}' "$here/tools/kind/go.mod")"
  local dir; dir="$(go env GOMODCACHE)/sigs.k8s.io/kind@$v"
  if [[ ! -d "$dir/images/base/files" ]]; then
    (cd "$here/tools/kind" && go mod download sigs.k8s.io/kind)
  fi
  echo "$dir"
}

# component_image <ref> <binary> <from> [entrypoint]
component_image() {
  local ref="$1" bin="$2" from="$3" entry="${4:-}"
  local b; b="$(basename "$bin")"
  local dockerfile
  dockerfile="$(
    echo "FROM $from"
    echo "COPY $b /usr/local/bin/$b"
    echo "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    if [[ -n "$entry" ]]; then echo "ENTRYPOINT [\"/usr/local/bin/$b\"]"; fi
  )"
  # Keyed by the binary's path, which names its build (each tool's cache
  # directory is keyed by what it was built from), size and mtime: reading
  # 100 MB binaries to hash them took seconds on every `up`.
  local key
  key="$(printf '%s\n%s %s\n' "$dockerfile" "${bin#"$cache"/}" "$(stat -c '%s %Y' "$bin")" |
    sha256sum | cut -c1-12)"
  if [[ "$("$DOCKER" image inspect -f '{{index .Config.Labels "natsmesh.key"}}' "$ref" 2>/dev/null)" == "$key" ]]; then
    return
  fi
  local ctx; ctx="$(mktemp -d)"
  cp "$bin" "$ctx/"
  printf '%s\nLABEL natsmesh.key=%s\n' "$dockerfile" "$key" >"$ctx/Dockerfile"
  DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build -q -t "$ref" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "built $ref"
}

component_images() {
  local kubeadm; kubeadm="$(bin_of kubeadm)"
  local ref n
  COMPONENT_IMAGES=()
  while read -r ref; do
    n="${ref##*/}"; n="${n%%:*}"
    case "$n" in
      kube-apiserver | kube-controller-manager | kube-scheduler)
        component_image "$ref" "$(bin_of "$n")" scratch ;;
      kube-proxy) component_image "$ref" "$(bin_of kube-proxy)" "$CLUSTER_OS" ;;
      etcd) component_image "$ref" "$(bin_of etcd)" scratch ;;
      coredns) component_image "$ref" "$(bin_of coredns)" scratch entry ;;
      pause) component_image "$ref" "$(bin_of pause)" scratch entry; PAUSE_IMAGE="$ref" ;;
      *) log "no recipe for the component image $ref"; exit 1 ;;
    esac
    COMPONENT_IMAGES+=("$ref")
  done < <("$kubeadm" config images list --kubernetes-version "$k8s_version")
}

cri_base_json() {
  # What kind's base image does with `ctr oci spec | jq ...`.
  "$(bin_of ctr)" oci spec | python3 -c '
import json, sys
spec = json.load(sys.stdin)
spec.setdefault("hooks", {}).setdefault("createContainer", []).append(
    {"path": "/kind/bin/mount-product-files.sh"})
spec["process"].pop("rlimits", None)
json.dump(spec, sys.stdout, indent=4)'
}

node_image() {
  local start=$SECONDS
  # One build of the node image at a time (hack/kind-ahead.sh builds it in
  # the background while a kind tier may already ask for it).
  mkdir -p "$cache"
  exec 7>"$cache/.lock-node-image"
  flock 7
  "$here/tools.sh" >/dev/null
  "$here/kind-tools.sh" >/dev/null
  docker_up
  local os; os="$("$here/images.sh" --rootfs kind-os "$NODE_OS_PACKAGES")"
  # The cluster's one Debian base, which component_images and addon_images
  # put kube-proxy, the add-ons and NATS on.
  CLUSTER_OS="$("$here/images.sh" --rootfs kind-cluster-os "$CLUSTER_OS_PACKAGES")"
  component_images
  addon_images
  local kind_dir; kind_dir="$(kind_module_dir)"

  local node_bins=(containerd containerd-shim-runc-v2 ctr runc crictl kubelet kubeadm kubectl)
  local cni_bins=(host-local loopback ptp bridge portmap)
  local b bins=()
  for b in "${node_bins[@]}" "${cni_bins[@]}"; do bins+=("$(bin_of "$b")"); done
  # The key, without copying or reading the ~300 MB of binaries (seconds on
  # every `up`): their paths name them (each tool's cache directory is keyed
  # by what it was built from), with size and mtime for a binary rebuilt in
  # place; kind's base files and ours are hashed.
  local ids
  ids="$("$DOCKER" image inspect -f '{{.Id}}' "$os" "${COMPONENT_IMAGES[@]}" "${ADDON_IMAGES[@]}")"
  local key
  key="$( {
    printf '%s\n' "${bins[@]#"$cache"/}"
    stat -c '%s %Y' "${bins[@]}"
    (cd "$kind_dir/images/base/files" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    sha256sum "$here/kind/node.Dockerfile" | cut -d' ' -f1
    cri_base_json
    echo "$ids"
  } | sha256sum | cut -c1-12)"
  NODE_IMAGE="natsmesh/kind-node:$k8s_version-$key"
  if "$DOCKER" image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
    log "node image $NODE_IMAGE present"
    return
  fi

  CLEANUP_DIR="$(mktemp -d)"
  local ctx="$CLEANUP_DIR"
  cp -r "$kind_dir/images/base/files" "$ctx/files" && chmod -R u+w "$ctx/files"
  mkdir -p "$ctx/bin" "$ctx/cni"
  cp "${bins[@]:0:${#node_bins[@]}}" "$ctx/bin/"
  cp "${bins[@]:${#node_bins[@]}}" "$ctx/cni/"
  cri_base_json >"$ctx/cri-base.json"
  cp "$here/kind/node.Dockerfile" "$ctx/Dockerfile"
  log "building $NODE_IMAGE"
  DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build -q -t "$NODE_IMAGE-base" \
    --build-arg "OS_IMAGE=$os" --build-arg "KUBERNETES_VERSION=$k8s_version" \
    --build-arg "PAUSE_IMAGE=$PAUSE_IMAGE" "$ctx" >/dev/null

  # Import the component images into the node's containerd, then commit.
  CLEANUP_CONTAINER="$("$DOCKER" run -d --privileged --entrypoint sleep "$NODE_IMAGE-base" infinity)"
  local cid="$CLEANUP_CONTAINER"
  "$DOCKER" exec "$cid" sh -c 'containerd >/tmp/containerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    "$DOCKER" exec "$cid" ctr info >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" save "${COMPONENT_IMAGES[@]}" "${ADDON_IMAGES[@]}" | "$DOCKER" exec -i "$cid" \
    ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned \
    --all-platforms --no-unpack --digests - >/dev/null
  # A multi-image archive also leaves an "import-<date>@sha256:..." name: drop it.
  "$DOCKER" exec "$cid" sh -c 'ctr -n k8s.io images list -q | grep "^import-" | xargs -r ctr -n k8s.io images rm >/dev/null'
  "$DOCKER" exec "$cid" ctr --namespace=k8s.io images list -q | grep -v '^sha256:' >&2
  "$DOCKER" exec "$cid" sh -c 'kill $(pidof containerd); while pidof containerd >/dev/null; do sleep 0.2; done; rm -f /tmp/containerd.log'
  "$DOCKER" commit \
    --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    "$cid" "$NODE_IMAGE" >/dev/null
  "$DOCKER" rm -f -v "$cid" >/dev/null
  CLEANUP_CONTAINER=""
  "$DOCKER" rmi "$NODE_IMAGE-base" >/dev/null
  rm -rf "$ctx"
  log "node image $NODE_IMAGE built in $((SECONDS - start))s"
}

kind_config() {
  cat <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
nodes:
- role: control-plane
- role: worker
kubeadmConfigPatches:
- |
  kind: KubeletConfiguration
  failCgroupV1: false
  # Ready is reported on the kubelet's next status update after the CNI
  # config lands (install_cni): every 10 s by default, ~15 s of every up.
  nodeStatusUpdateFrequency: 2s
EOF
}

# The pod network: ptp + host-local on each node's podCIDR, routes between nodes.
install_cni() {
  local kubectl; kubectl="$(bin_of kubectl)"
  local nodes; nodes="$("$kubectl" --kubeconfig "$kubeconfig" get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.podCIDR}{" "}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')"
  local n cidr ip m mcidr mip
  while read -r n cidr ip; do
    [[ -n "$n" ]] || continue
    "$DOCKER" exec -i "$n" sh -c 'cat > /etc/cni/net.d/10-natsmesh-ptp.conflist' <<EOF
{
  "cniVersion": "0.4.0",
  "name": "natsmesh-ptp",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
              "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "$cidr"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    while read -r m mcidr mip; do
      [[ -n "$m" && "$m" != "$n" ]] || continue
      "$DOCKER" exec "$n" ip route replace "$mcidr" via "$mip"
    done <<<"$nodes"
  done <<<"$nodes"
}

nats_image() {
  local v; v="$(awk '$1 == "github.com/nats-io/nats-server/v2" {print $2}' "$here/tools/nats/go.mod")"
  echo "natsmesh/nats:${v#v}"
}

# addon_image <tools module> <binary>: the binary on the cluster's Debian base
# (built once, cached in Docker); prints the image name.
addon_image() {
  local module="$1" bin="$2" mod v
  mod="$(awk '$1 == "tool" {print $2}' "$here/tools/$module/go.mod")"
  v="$(awk -v m="$mod" 'index(m, $1) == 1 && $2 ~ /^v/ {print $2}' "$here/tools/$module/go.mod" | head -1)"
  local image="natsmesh/$bin:$v"
  component_image "$image" "$(bin_of "$bin")" "$CLUSTER_OS" entry
  echo "$image"
}

# apply_addon <manifest under hack/kind/> <image>: applied with __IMAGE__ = image.
apply_addon() {
  sed "s|__IMAGE__|$2|g" "$here/kind/$1" | kubectl_ apply -f - >&2
}

# The images of the cluster's own add-ons and of the chart's NATS server
# (nats-server on the cluster's Debian base: its probes exec `sh -c wget ...`):
# versioned with the toolchain, so imported into the node image with the
# component images (pinned, unpacked on first use) rather than loaded on
# every `up`, where they were half of `kind load`'s 36 s.
addon_images() {
  ROUTER_IMAGE="$(addon_image kuberouter kube-router)"
  PATH_IMAGE="$(addon_image localpath local-path-provisioner)"
  NATS_IMAGE="$(nats_image)"
  component_image "$NATS_IMAGE" "$(bin_of nats-server)" "$CLUSTER_OS"
  ADDON_IMAGES=("$ROUTER_IMAGE" "$PATH_IMAGE" "$NATS_IMAGE")
}

# natsmesh's images, which change with every commit (and any images given):
# loaded in one go (one tar, imported into each node).
load_images() {
  "$here/images.sh" >&2
  local images; mapfile -t images < <("$here/images.sh" --print | tail -4)
  "$(bin_of kind)" load docker-image --name "$name" "${images[@]}" "$@" >&2
}

kubectl_() { "$(bin_of kubectl)" --kubeconfig "$kubeconfig" "$@"; }

up() {
  mkdir -p "$state"
  # One `up` per cluster at a time: a second one waits, then finds
  # everything in place and only re-checks it.
  exec 8>"$state.lock"
  flock 8
  node_image
  local kind_bin; kind_bin="$(bin_of kind)"
  local extra=()
  if "$kind_bin" get clusters 2>/dev/null | grep -qx "$name"; then
    log "cluster $name exists"
    "$kind_bin" get kubeconfig --name "$name" >"$kubeconfig"
    # Made from an older node image, it may lack this toolchain's add-on
    # and NATS images (kind load skips the ones a node has).
    extra=("${ADDON_IMAGES[@]}")
  else
    local start=$SECONDS
    kind_config >"$state/kind.yaml"
    "$kind_bin" create cluster --name "$name" --image "$NODE_IMAGE" \
      --config "$state/kind.yaml" --kubeconfig "$kubeconfig" --retain
    log "cluster created in $((SECONDS - start))s"
  fi
  install_cni
  load_images "${extra[@]}"
  kubectl_ wait --for=condition=Ready nodes --all --timeout=180s >&2
  # NetworkPolicy enforcement: kube-router's firewall on the ptp network.
  apply_addon kube-router.yaml "$ROUTER_IMAGE"
  # The default StorageClass (the chart's NATS StatefulSet claims a PVC). kind
  # made one named "standard" for kubernetes.io/host-path, which nothing
  # serves here (the node image has no /kind/manifests/default-storage.yaml):
  # replaced by local-path's, under the same name.
  local sc
  sc="$(kubectl_ get storageclass standard -o 'jsonpath={.provisioner}' 2>/dev/null || true)"
  [[ -z "$sc" || "$sc" == rancher.io/local-path ]] || kubectl_ delete storageclass standard >&2
  apply_addon local-path.yaml "$PATH_IMAGE"
  # Applied together, waited for together.
  kubectl_ -n kube-system rollout status ds/kube-router --timeout=180s >&2
  kubectl_ -n local-path-storage rollout status deploy/local-path-provisioner --timeout=180s >&2
  kubectl_ -n kube-system rollout status deploy/coredns --timeout=180s >&2
  log "ready: export KUBECONFIG=$kubeconfig"
}

down() {
  docker_up >/dev/null
  local kind_bin; kind_bin="$(bin_of kind)"
  "$kind_bin" delete cluster --name "$name" --kubeconfig "$kubeconfig" || true
  rm -rf "$state" "$state.lock"
}

case "${1:-up}" in
  image) node_image; echo "$NODE_IMAGE" ;;
  nats-image) nats_image ;;
  up) up ;;
  down) down ;;
  env)
    echo "export KUBECONFIG=$kubeconfig"
    echo "export PATH=$(all_bin_dirs | tr '\n' ':')\$PATH"
    ;;
  *) echo "usage: $0 image|up|down|env" >&2; exit 2 ;;
esac
