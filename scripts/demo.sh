#!/usr/bin/env bash
# The main job, from a fresh Debian machine: start gpud with its embedded default configuration (`gpud run --dev`:
# two static GPUs 0:low,1:high, the example presets) on a private Podman engine, and stream a demo task.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
scripts/engines.sh start
cleanup() {
  [[ -n "${GPUD_PID:-}" ]] && kill "$GPUD_PID" 2>/dev/null && wait "$GPUD_PID" || true
  scripts/engines.sh stop
}
trap cleanup EXIT
eval "$(scripts/engines.sh env)"
scripts/build-images.sh

# The dev configuration fetches no models: `gpud run --dev` places the demo model (examples/models/demo-text)
# in its own cache when it is missing.
port="${GPUD_DEMO_PORT:-8001}"
GPUD_RUNTIME=podman GPUD_RUNTIME_SOCKET="$GPUD_TEST_PODMAN_SOCKET" \
  .venv/bin/gpud run --dev --listen "127.0.0.1:$port" &
GPUD_PID=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
.venv/bin/python examples/demo.py "http://127.0.0.1:$port"
