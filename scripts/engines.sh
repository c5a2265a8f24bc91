#!/usr/bin/env bash
# Start/stop private Podman API and Docker engine instances for gpud's tests and benchmarks.
#
#   scripts/engines.sh start   # start both (each skipped with a note if its binary is missing)
#   scripts/engines.sh env     # print: export GPUD_TEST_PODMAN_SOCKET=... GPUD_TEST_DOCKER_SOCKET=...
#   scripts/engines.sh status
#   scripts/engines.sh stop    # stop only what `start` started (by its own PID files)
#
# Installs nothing and never edits /etc: Podman's settings come from tests/engines/containers.conf via
# CONTAINERS_CONF. State lives under $GPUD_ENGINES_DIR (default /tmp/gpud-engines).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${GPUD_ENGINES_DIR:-/tmp/gpud-engines}"
PODMAN_SOCK="$DIR/podman.sock"
DOCKER_SOCK="$DIR/docker.sock"
export CONTAINERS_CONF="$REPO/tests/engines/containers.conf"

log() { echo "engines: $*" >&2; }

alive() { # alive PIDFILE -> 0 when the recorded process still runs
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for NAME CMD... -> waits up to 30 s for CMD to succeed
  local name="$1"; shift
  for _ in $(seq 1 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "$name did not answer within 30 s; see $DIR/$name.log"
  return 1
}

ping_socket() { # ping_socket SOCKET PATH -> HTTP GET over the unix socket answers 200
  curl -fsS --max-time 2 --unix-socket "$1" "http://d$2" >/dev/null
}

start_podman() {
  if ! command -v podman >/dev/null; then log "podman not installed; skipping"; return 0; fi
  if alive "$DIR/podman.pid"; then log "podman service already running (pid $(cat "$DIR/podman.pid"))"; return 0; fi
  rm -f "$PODMAN_SOCK"
  # setsid: the service must outlive this script and must not get the caller's terminal signals.
  # cwd $DIR: conmon (podman 4.3) drops an `oom` marker file in its working directory; keep it out of the repo.
  (cd "$DIR" && exec setsid podman system service --time=0 "unix://$PODMAN_SOCK" >"$DIR/podman.log" 2>&1 </dev/null) &
  echo $! >"$DIR/podman.pid"
  wait_for podman ping_socket "$PODMAN_SOCK" /_ping
  log "podman API at $PODMAN_SOCK (pid $(cat "$DIR/podman.pid"))"
}

start_docker() {
  if ! command -v dockerd >/dev/null; then log "dockerd not installed; skipping"; return 0; fi
  if alive "$DIR/docker.pid"; then log "dockerd already running (pid $(cat "$DIR/docker.pid"))"; return 0; fi
  rm -f "$DOCKER_SOCK"
  mkdir -p "$DIR/docker-data" "$DIR/docker-exec"
  # No iptables/bridge: workers run with --network none, and the host's firewall stays untouched.
  # Lowered ulimits: the machine lacks CAP_SYS_RESOURCE, so containers may not raise them.
  cd "$DIR"
  setsid dockerd --host "unix://$DOCKER_SOCK" --data-root "$DIR/docker-data" --exec-root "$DIR/docker-exec" \
    --pidfile "$DIR/docker.pid" --iptables=false --ip-masq=false --bridge=none \
    --default-ulimit nofile=1024:1024 --default-ulimit nproc=1024:1024 \
    >"$DIR/docker.log" 2>&1 </dev/null &
  echo $! >"$DIR/docker.launcher.pid"
  wait_for docker ping_socket "$DOCKER_SOCK" /_ping
  log "docker API at $DOCKER_SOCK (pid $(cat "$DIR/docker.pid"))"
}

stop_one() { # stop_one NAME PIDFILE
  local name="$1" pidfile="$2" pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then log "$name (pid $pid) ignored SIGTERM; killing"; kill -KILL "$pid" || true; fi
  rm -f "$pidfile"
  log "stopped $name (pid $pid)"
}

case "${1:-}" in
  start)
    mkdir -p "$DIR"
    start_podman
    start_docker
    ;;
  stop)
    stop_one docker "$DIR/docker.pid"
    rm -f "$DIR/docker.launcher.pid" "$DOCKER_SOCK"
    stop_one podman "$DIR/podman.pid"
    rm -f "$PODMAN_SOCK"
    ;;
  env)
    line="export"
    if alive "$DIR/podman.pid"; then line+=" GPUD_TEST_PODMAN_SOCKET=$PODMAN_SOCK"; fi
    if alive "$DIR/docker.pid"; then line+=" GPUD_TEST_DOCKER_SOCKET=$DOCKER_SOCK"; fi
    line+=" CONTAINERS_CONF=$CONTAINERS_CONF"
    echo "$line"
    ;;
  status)
    alive "$DIR/podman.pid" && echo "podman: running (pid $(cat "$DIR/podman.pid"))" || echo "podman: stopped"
    alive "$DIR/docker.pid" && echo "docker: running (pid $(cat "$DIR/docker.pid"))" || echo "docker: stopped"
    ;;
  *)
    echo "usage: $0 start|stop|env|status" >&2
    exit 2
    ;;
esac
