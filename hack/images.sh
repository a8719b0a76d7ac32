#!/usr/bin/env bash
# Builds natsmesh's container images here, with no image registry:
#
#   1. a Docker engine (hack/docker.sh up: docker.io and mmdebstrap from the
#      distribution if missing, dockerd started if none answers);
#   2. three Debian bookworm base images from mmdebstrap | docker import:
#        natsmesh/base:<key>   python3 only (the runtime base)
#        natsmesh/build:<key>  python3 + python3-venv (build stages only)
#        natsmesh/base-cxx:<key> python3 + libstdc++6 (the gRPC example app)
#      --variant=essential: no apt, no compilers; no docs, man pages or
#      locales; no apt sources (no registry hostname in any image);
#   3. wheels built on the host from the hashed lock files
#      (pip wheel --require-hashes), installed in the image with --no-index;
#   4. the Dockerfile's sidecar, operator and example-stock (the shop's gRPC
#      app, grpcio) targets and the shop's demo app (examples/apps), each
#      tagged natsmesh/<name>:$NATSMESH_IMAGE_TAG (default: the chart's
#      appVersion).
#
#   hack/images.sh            build what is missing, print the sizes
#   hack/images.sh --print    print the image names (base, build, sidecar,
#                             operator, app, stock), build nothing
#   hack/images.sh --rootfs <name> <pkg,pkg,...>
#                             only make the mmdebstrap image natsmesh/<name>:<key>
#                             with those packages (the kind node's OS, the
#                             kube-proxy base) and print its name
#
# Everything is cached by content: the root file systems under
# ~/.cache/natsmesh/images/<name>-<key>/ (key = hash of the mmdebstrap
# command line) and the wheels under ~/.cache/natsmesh/wheels-<key>/ (key =
# hash of the lock files and the Python version), so a warm run only asks
# Docker's layer cache.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}"
tag="${NATSMESH_IMAGE_TAG:-$(awk -F'"' '/^appVersion:/ {print $2}' "$repo/charts/natsmesh/Chart.yaml")}"
suite=bookworm
epoch=1735689600   # SOURCE_DATE_EPOCH: same inputs, same file times

mmdebstrap_args() {
  local packages="$1"
  printf '%s\n' \
    --variant=essential \
    "--include=$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    '--dpkgopt=path-exclude=/usr/share/man/*' \
    '--dpkgopt=path-exclude=/usr/share/doc/*' \
    '--dpkgopt=path-include=/usr/share/doc/*/copyright' \
    '--dpkgopt=path-exclude=/usr/share/locale/*' \
    '--dpkgopt=path-exclude=/usr/share/info/*' \
    '--customize-hook=rm -rf "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/* "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    "$suite"
}

rootfs_key() {
  { mmdebstrap_args "$1"; echo "$epoch"; } | sha256sum | cut -c1-12
}

image_of() { echo "natsmesh/$1:$suite-$(rootfs_key "$2")"; }

BASE_PACKAGES=python3
BUILD_PACKAGES=python3,python3-venv
#: The gRPC example app's runtime: grpcio's extension links libstdc++.
STOCK_PACKAGES=python3,libstdc++6
#: The lock files (requirements/) whose wheels the images install.
LOCKS=(sidecar.txt operator.txt example-stock.txt)

wheels_key() {
  { cat "${LOCKS[@]/#/$repo/requirements/}"; py_tag; } | sha256sum | cut -c1-12
}

host_python() {
  local p
  for p in "${PYTHON:-}" python3.11 "$repo/.venv/bin/python" python3; do
    [[ -n "$p" ]] && command -v "$p" >/dev/null && { echo "$p"; return; }
  done
  echo "images: no python3.11 on the host to build wheels with" >&2
  exit 1
}

py_tag() { "$(host_python)" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")'; }

if [[ "${1:-}" == "--print" ]]; then
  image_of base "$BASE_PACKAGES"
  image_of build "$BUILD_PACKAGES"
  echo "natsmesh/sidecar:$tag"
  echo "natsmesh/operator:$tag"
  echo "natsmesh/example-shop:$tag"
  echo "natsmesh/example-stock:$tag"
  exit 0
fi

timer() { echo "images: $1 in $((SECONDS - $2))s"; }

eval "$("$here/docker.sh" up | grep '^DOCKER=')"
export DOCKER_BUILDKIT=1

# One build at a time into the cache and Docker (the kind tier and the image
# tests run side by side in CI): the second waits, then finds everything built.
# Taken after docker.sh up, so a dockerd started there does not inherit the lock.
mkdir -p "$cache"
exec 9>"$cache/.lock-images"
flock 9

base_image() {
  local name="$1" packages="$2"
  local key; key="$(rootfs_key "$packages")"
  local image="natsmesh/$name:$suite-$key"
  local dir="$cache/images/$name-$key"
  if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "images: $image present"
    return
  fi
  local start=$SECONDS
  if [[ ! -f "$dir/.complete" ]]; then
    echo "images: mmdebstrap $suite ($packages) into $dir"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    local args; mapfile -t args < <(mmdebstrap_args "$packages")
    # Downloads from the Debian mirror fail now and then ("apt download
    # failed" three times within a minute in one cold CI run, fine a minute
    # later): a few tries, further apart each time, before giving up.
    # Its whole output goes to a log, and on failure apt's own last words to
    # stderr: with --quiet a failed download only says "apt download failed".
    local try log="$dir.tmp/mmdebstrap.log" seen_missing=0
    local missing="Unable to locate package|has no installation candidate|Couldn't find any package"
    for try in 1 2 3 4; do
      SOURCE_DATE_EPOCH=$epoch nice -n 10 mmdebstrap "${args[@]}" "$dir.tmp/rootfs.tar" >"$log" 2>&1 && break
      grep -E '^(E|W):|[Ee]rr(or)?[: ]|[Ff]ailed' "$log" | tail -n 20 | sed "s/^/images: mmdebstrap: /" >&2 || true
      # A package that does not exist stays missing: after the second try
      # that says so (the first could be a bad index fetch), no more waiting.
      if grep -qE "$missing" "$log"; then
        if ((seen_missing)); then
          echo "images: mmdebstrap of $name: a package of ($packages) is not in $suite (log: $log)" >&2
          exit 1
        fi
        seen_missing=1
      fi
      if ((try == 4)); then
        echo "images: mmdebstrap of $name failed $try times; giving up (log: $log)" >&2
        exit 1
      fi
      echo "images: mmdebstrap of $name failed (try $try of 4); again in $((try * 20))s" >&2
      sleep $((try * 20))
    done
    touch "$dir.tmp/.complete"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  local change=()
  [[ ",$packages," == *,python3,* ]] && change=(--change 'CMD ["python3"]')
  "$DOCKER" import "${change[@]}" "$dir/rootfs.tar" "$image" >/dev/null
  timer "$image imported" "$start"
}

wheels() {
  local dir; dir="$cache/wheels-$(wheels_key)"
  if [[ ! -f "$dir/.complete" ]]; then
    local start=$SECONDS
    echo "images: building wheels from requirements/{${LOCKS[*]}} into $dir"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    local reqs=() lock
    for lock in "${LOCKS[@]}"; do reqs+=(-r "$repo/requirements/$lock"); done
    nice -n 10 "$(host_python)" -m pip wheel -q --disable-pip-version-check --require-hashes \
      "${reqs[@]}" -w "$dir.tmp"
    touch "$dir.tmp/.complete"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    timer "wheels built" "$start"
  fi
  # The build context holds a copy (hard links where possible) under .work/.
  rm -rf "$repo/.work/wheels" && mkdir -p "$repo/.work/wheels"
  cp -l "$dir"/*.whl "$repo/.work/wheels/" 2>/dev/null || cp "$dir"/*.whl "$repo/.work/wheels/"
  # The lock's hashes are those of PyPI's files, checked above by pip wheel;
  # a package published only as an sdist (nkeys) becomes a wheel of another
  # hash here. So each image installs from a lock of the wheelhouse itself:
  # the lock's pins, each with the hash of the wheel built from it.
  for t in "${LOCKS[@]%.txt}"; do
    "$(host_python)" - "$repo/requirements/$t.txt" "$repo/.work/wheels" >"$repo/.work/wheels/$t.txt" <<'PY'
import hashlib, pathlib, re, sys
lock, wheels = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()
files = {}
for w in wheels.glob("*.whl"):
    name, version = w.name.split("-")[:2]
    files[(norm(name), version)] = w
for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.M):
    w = files[(norm(m[1]), m[2])]
    print(f"{m[1]}=={m[2]} --hash=sha256:{hashlib.sha256(w.read_bytes()).hexdigest()}")
PY
  done
}

build() {
  local image="$1"; shift
  local start=$SECONDS
  nice -n 10 "$DOCKER" build -q -t "$image" "$@" >/dev/null
  timer "$image built" "$start"
}

if [[ "${1:-}" == "--rootfs" ]]; then
  base_image "$2" "$3" >&2
  image_of "$2" "$3"
  exit 0
fi

total=$SECONDS
base_image base "$BASE_PACKAGES"
base_image build "$BUILD_PACKAGES"
base_image base-cxx "$STOCK_PACKAGES"
wheels
base="$(image_of base "$BASE_PACKAGES")"
buildimg="$(image_of build "$BUILD_PACKAGES")"
args=(--build-arg "BASE_IMAGE=$base" --build-arg "BUILD_IMAGE=$buildimg")
build "natsmesh/sidecar:$tag" "${args[@]}" --target sidecar "$repo"
build "natsmesh/operator:$tag" "${args[@]}" --target operator "$repo"
build "natsmesh/example-stock:$tag" "${args[@]}" --target example-stock \
  --build-arg "STOCK_BASE_IMAGE=$(image_of base-cxx "$STOCK_PACKAGES")" "$repo"
build "natsmesh/example-shop:$tag" --build-arg "PYTHON_IMAGE=$base" "$repo/examples/apps"
timer "all images ready" "$total"

for image in "$base" "natsmesh/sidecar:$tag" "natsmesh/operator:$tag" "natsmesh/example-shop:$tag" \
  "natsmesh/example-stock:$tag"; do
  "$DOCKER" image inspect -f '{{.Size}}' "$image" | awk -v i="$image" '{printf "  %-44s %6.1f MB\n", i, $1 / 1e6}'
done
