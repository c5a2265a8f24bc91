#!/usr/bin/env bash
# Build a wheelhouse: gpud's own wheel and a wheel of every dependency, for installing where there is no package
# index (`scripts/install.sh --wheelhouse DIR`, the gpud container image, the end-to-end tests).
#
#   scripts/wheelhouse.sh DIR      # on a connected machine of the target's kind (Debian 12, x86_64, Python 3.11)
#
# It is `pip wheel --wheel-dir DIR .` plus a cache: dependency wheels are kept in .cache/wheelhouse/deps-<hash>,
# where <hash> covers setup.py and pyproject.toml, so a rebuild after a code change fetches nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/wheelhouse.sh DIR}"
log() { echo "wheelhouse: $*" >&2; }

python_with_pip() { # the repo's venv, else a throwaway one (Debian's python3 has no pip of its own)
  if [[ -x $REPO/.venv/bin/python ]]; then
    echo "$REPO/.venv/bin/python"
    return
  fi
  local tmp="${TMPDIR:-/tmp}/gpud-wheelhouse-venv"
  [[ -x $tmp/bin/python ]] || python3 -m venv "$tmp"
  echo "$tmp/bin/python"
}

PY="$(python_with_pip)"
deps_hash="$(cat "$REPO/setup.py" "$REPO/pyproject.toml" | sha256sum | cut -c1-16)"
deps="$REPO/.cache/wheelhouse/deps-$deps_hash"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# gpud's own wheel from a copy of the sources, so no build/ or egg-info is left in the checkout.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
tar -C "$REPO" --exclude=__pycache__ --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude='*.egg-info' \
  --exclude=./build --exclude=./dist --exclude=./tests --exclude=./bench -cf - . | tar -C "$build" -xf -
rm -f "$OUT"/gpud-*.whl
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$build"
if [[ ! -d $deps ]]; then
  log "fetching dependency wheels into $deps"
  rm -rf "$deps.partial" && mkdir -p "$deps.partial"
  # The requirements as the wheel declares them (extras left out): never resolve "gpud" itself from the index.
  "$PY" - "$OUT"/gpud-*.whl >"$deps.partial/requirements.txt" <<'PYTHON'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: ") and "extra ==" not in line:
            print(line.removeprefix("Requires-Dist: "))
PYTHON
  "$PY" -m pip wheel --quiet --wheel-dir "$deps.partial" -r "$deps.partial/requirements.txt"
  mv "$deps.partial" "$deps"
  find "$REPO/.cache/wheelhouse" -maxdepth 1 -name 'deps-*' ! -name "deps-$deps_hash" -exec rm -rf {} +
fi
cp -n "$deps"/*.whl "$OUT"/
log "$(find "$OUT" -name '*.whl' | wc -l) wheels in $OUT"
