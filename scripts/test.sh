#!/usr/bin/env bash
# The full test suite, from a fresh Debian machine: installs what is missing, starts private Podman and Docker
# engines, builds the worker image, runs ruff, mypy and pytest (engines required: nothing is skipped for lack
# of an engine), then stops the engines it started. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== lint and types" >&2
ruff check gpud gpuctl tests bench etc
ruff format --check gpud gpuctl tests bench etc
mypy gpud gpuctl

echo "== engines and worker image" >&2
scripts/engines.sh start
trap 'scripts/engines.sh stop' EXIT
eval "$(scripts/engines.sh env)"
scripts/build-images.sh

echo "== tests" >&2
GPUD_REQUIRE_ENGINES=1 pytest -q -p no:cacheprovider "$@" tests
