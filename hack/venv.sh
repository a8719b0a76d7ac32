#!/usr/bin/env bash
# Creates .venv from the hashed lock files: a fresh machine gets exactly the
# versions CI ran with. Re-runs only when a lock file or pyproject.toml changed.
#
# pip installs only uv, pinned and hashed in requirements/dev.txt; uv then
# installs the locks (--require-hashes, as pip would): about 15 s instead of
# pip's 55 on a 2-core box, most of CI's environment phase.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
stamp="$venv/.installed"

# Bytecode: with PYTHONDONTWRITEBYTECODE set (as on the CI machine) and uv
# compiling nothing by default, every Python process would compile each
# module it imports from source, every time: 1.45 s instead of 0.6 s to start
# a sidecar, paid by each of the hundreds the tests start. The project's own
# sources are compiled on every call (only what changed is rewritten).
compile_project() {
  "$venv/bin/python" -m compileall -q -j0 "$repo/sidecar" "$repo/operator" "$repo/tests" \
    "$repo/bench" "$repo/examples" >/dev/null || echo "venv: compileall reported errors" >&2
}
want="$(cat "$repo/requirements/dev.txt" "$repo/requirements/build.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  compile_project
  echo "venv: up to date ($venv)"
  exit 0
fi
start=$SECONDS
pip() { "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
# uv's own pin, cut from the lock: one requirement with its hashes.
uv_req="$(mktemp)"
trap 'rm -f "$uv_req"' EXIT
awk '/^uv==/ {p = 1} p {print} p && !/\\$/ {exit}' "$repo/requirements/dev.txt" >"$uv_req"
# uv itself is kept under ~/.cache/natsmesh, keyed by its pin: a venv made
# with uv needs no pip of its own (ensurepip and installing uv were ~10 s of
# every fresh clone's ~25).
uv_dir="${NATSMESH_CACHE:-$HOME/.cache/natsmesh}/uv-$(sha256sum "$uv_req" | cut -c1-12)"
if [[ -s "$uv_req" && ! -x "$uv_dir/bin/uv" ]]; then
  tmp="$uv_dir.tmp.$$"
  "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    --require-hashes --target "$tmp" -r "$uv_req" && mv -T "$tmp" "$uv_dir" 2>/dev/null
  rm -rf "$tmp"
fi
if [[ -x "$uv_dir/bin/uv" ]]; then
  [[ -x "$venv/bin/python" ]] || "$python" -m venv --without-pip "$venv"
  uv=("$uv_dir/bin/uv" pip install -q --python "$venv/bin/python" --compile-bytecode)
  "${uv[@]}" --require-hashes -r "$repo/requirements/build.txt" -r "$repo/requirements/dev.txt"
  # The project itself: editable, no dependency resolution (the lock did that).
  "${uv[@]}" --no-build-isolation --no-deps -e "$repo"
else
  echo "venv: uv is not installable, falling back to pip" >&2
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip -q
  pip --require-hashes -r "$repo/requirements/build.txt"
  pip --require-hashes -r "$repo/requirements/dev.txt"
  pip --no-build-isolation --no-deps -e "$repo"
fi
compile_project
echo "$want" > "$stamp"
echo "venv: installed in $((SECONDS - start))s ($venv)"
