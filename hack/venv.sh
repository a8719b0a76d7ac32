#!/usr/bin/env bash
# Creates .venv from the hashed lock files: a fresh machine gets exactly the
# versions CI ran with. Re-runs only when a lock file or pyproject.toml changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
stamp="$venv/.installed"
want="$(cat "$repo/requirements/dev.txt" "$repo/requirements/build.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "venv: up to date ($venv)"
  exit 0
fi
start=$SECONDS
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$repo/requirements/build.txt"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r "$repo/requirements/dev.txt"
# The project itself: editable, no dependency resolution (the lock did that).
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$repo"
echo "$want" > "$stamp"
echo "venv: installed in $((SECONDS - start))s ($venv)"
