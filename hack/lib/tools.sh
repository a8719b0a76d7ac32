# Sourced by hack/tools.sh and hack/kind-tools.sh: where built tools live, how
# a tool set's cache key is made, and the Kubernetes version both build.

cache="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}"
# The control plane (hack/tools.sh) and the nodes (hack/kind-tools.sh) must
# run the same Kubernetes: one pin.
k8s_version="v1.36.3"

key_of() {
  # Content hash of a tool module (and any main package of ours beside it):
  # changes whenever a pinned version does.
  (cd "$here/tools/$1" && cat go.mod go.sum $(ls ./*.go 2>/dev/null)) | sha256sum | cut -c1-12
}

bin_dir_of() { echo "$cache/bin/$1-$(key_of "$1")"; }

# -ldflags that stamp $k8s_version into a k8s.io/kubernetes build, so that
# `kubectl version`, /version and kubeadm report it: a module build carries no
# git metadata of its own.
k8s_version_ldflags() {
  local minor stamp="" p
  minor="$(echo "$k8s_version" | cut -d. -f2)"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    stamp+=" -X $p.gitTreeState=clean -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  echo "$stamp"
}

# Serialises builds into the cache: two checkouts (a CI run beside a worktree,
# two worktrees) building the same set would otherwise delete each other's
# half-built "$out.tmp". The second waits, then finds the set complete.
lock_cache() {
  mkdir -p "$cache"
  exec 9>"$cache/.lock-$1"
  if ! flock -n 9; then
    echo "tools: another build into $cache is running; waiting for it" >&2
    flock 9
  fi
}
