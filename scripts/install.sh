#!/usr/bin/env bash
# Install or upgrade gpud on a Debian host (12 or later) under systemd. Run as root from a checkout:
#
#   sudo scripts/install.sh                        # dependencies from the package index
#   sudo scripts/install.sh --wheelhouse DIR       # offline: gpud's wheel and every dependency from DIR
#                                                  # (made on a connected machine: pip wheel --wheel-dir DIR .)
#   options: --runtime podman|docker   --engine-socket PATH   --no-start
#
# What goes where (docs/deploy.md explains each piece, upgrade and uninstall):
#   /opt/gpud/releases/<version>-<time>/   a virtual environment per install; /opt/gpud/current points at one
#   /usr/local/bin/gpud, gpuctl            links into /opt/gpud/current/bin
#   /usr/local/lib/systemd/system/         gpud.service, gpud.socket (drop-ins of your own: /etc/systemd/system/)
#   /usr/local/lib/sysusers.d/gpud.conf    the gpud group (members may use gpuctl)
#   /usr/local/lib/tmpfiles.d/gpud.conf    /var/lib/gpud and its model cache
#   /etc/gpud/                             gpud.yaml, models.yaml, gpud.env: written once, never overwritten
#                                          (a newer shipped version lands beside yours as *.dist)
#   /usr/local/share/doc/gpud/             README.md and docs/
#   /opt/gpud/uninstall.sh                 removes all of the above except /etc/gpud and /var/lib/gpud (--purge: all)
# An upgrade is the same command from a newer checkout: a new release is built beside the running one, the
# `current` link is switched in one rename, gpud is restarted, and the previous release is kept for a rollback.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/gpud
UNIT_DIR=/usr/local/lib/systemd/system
LIB_DIR=/usr/local/lib
BIN_DIR=/usr/local/bin
DOC_DIR=/usr/local/share/doc/gpud
ETC_DIR=/etc/gpud
WHEELHOUSE=""
RUNTIME=""
ENGINE_SOCKET=""
START=1

log() { echo "install: $*" >&2; }
die() { echo "install: error: $*" >&2; exit 1; }
usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while (($#)); do
  case "$1" in
    --wheelhouse) WHEELHOUSE="$(cd "${2:?--wheelhouse needs a directory}" && pwd)"; shift 2 ;;
    --runtime) RUNTIME="${2:?--runtime needs podman or docker}"; shift 2 ;;
    --engine-socket) ENGINE_SOCKET="${2:?--engine-socket needs a path}"; shift 2 ;;
    --no-start) START=0; shift ;;
    -h | --help) usage ;;
    *) echo "install: unknown option $1" >&2; usage ;;
  esac
done
[[ -z $RUNTIME || $RUNTIME == podman || $RUNTIME == docker ]] || die "--runtime must be podman or docker"
[[ $(id -u) -eq 0 ]] || die "run as root (sudo $0)"

version() { sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/gpud/__init__.py"; }

need_python() { # a Python >= 3.11 with venv and ensurepip (Debian splits them into python3-venv)
  command -v python3 >/dev/null || die "python3 is missing: apt-get install python3 python3-venv"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "gpud needs Python 3.11 or later"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [[ -n $WHEELHOUSE ]] || ! command -v apt-get >/dev/null; then
      die "python3-venv is missing: apt-get install python3-venv (or from your local Debian mirror)"
    fi
    log "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2
  fi
}

build_release() { # build_release DIR -> a virtual environment with gpud installed, from the wheelhouse or the index
  local dir="$1"
  python3 -m venv "$dir"
  if [[ -n $WHEELHOUSE ]]; then
    # --no-index: nothing is fetched; gpud's own wheel must be in the wheelhouse, at this checkout's version.
    "$dir/bin/pip" install --quiet --no-index --find-links "$WHEELHOUSE" "gpud==$(version)"
  else
    "$dir/bin/pip" install --quiet "$SRC"
  fi
  "$dir/bin/gpud" version >/dev/null
}

switch_current() { # switch_current RELEASE -> /opt/gpud/current points at it (one rename: never half switched)
  ln -sfn "$1" "$PREFIX/.current.new"
  mv -T "$PREFIX/.current.new" "$PREFIX/current"
}

prune_releases() { # keep the current release and the one before it (rollback: docs/deploy.md)
  local current previous="${1:-}"
  current="$(readlink -f "$PREFIX/current")"
  for dir in "$PREFIX"/releases/*/; do
    dir="${dir%/}"
    [[ $dir == "$current" || $dir == "$previous" ]] || rm -rf "$dir"
  done
}

install_file() { # install_file MODE SRC DEST
  install -D -m "$1" "$2" "$3"
}

install_config() { # install_config NAME MODE [SED-SCRIPT] -> /etc/gpud/NAME once; a changed shipped file as NAME.dist
  local name="$1" mode="$2" script="${3:-}" tmp
  tmp="$(mktemp)"
  sed -e "$script" "$SRC/etc/gpud/$name" >"$tmp"
  if [[ ! -e $ETC_DIR/$name ]]; then
    install -m "$mode" "$tmp" "$ETC_DIR/$name"
    log "wrote $ETC_DIR/$name"
  elif ! cmp -s "$tmp" "$ETC_DIR/$name"; then
    install -m "$mode" "$tmp" "$ETC_DIR/$name.dist"
    log "kept your $ETC_DIR/$name; the shipped version is $ETC_DIR/$name.dist"
  fi
  rm -f "$tmp"
}

choose_engine() { # sets RUNTIME and ENGINE_SOCKET from the options, else from what this host has
  if [[ -z $RUNTIME ]]; then
    if [[ -S /run/podman/podman.sock ]] || systemctl cat podman.socket >/dev/null 2>&1; then
      RUNTIME=podman
    elif [[ -S /run/docker.sock ]] || systemctl cat docker.service >/dev/null 2>&1; then
      RUNTIME=docker
    else
      RUNTIME=podman
      log "warning: no Podman or Docker found; configuring Podman (apt-get install podman, then rerun this)"
    fi
  fi
  if [[ -z $ENGINE_SOCKET ]]; then
    if [[ $RUNTIME == podman ]]; then ENGINE_SOCKET=/run/podman/podman.sock; else ENGINE_SOCKET=/run/docker.sock; fi
  fi
  # Podman serves its API only while podman.socket listens; Debian installs it disabled.
  if [[ $RUNTIME == podman && $START == 1 ]] && systemctl cat podman.socket >/dev/null 2>&1; then
    systemctl enable --now podman.socket >&2
  fi
  [[ -S $ENGINE_SOCKET ]] || log "warning: no engine socket at $ENGINE_SOCKET yet; gpud reports it in /health"
  log "workers run on $RUNTIME through $ENGINE_SOCKET"
}

install_system_files() {
  install_file 0644 "$SRC/units/gpud.service" "$UNIT_DIR/gpud.service"
  install_file 0644 "$SRC/units/gpud.socket" "$UNIT_DIR/gpud.socket"
  install_file 0644 "$SRC/units/sysusers.d/gpud.conf" "$LIB_DIR/sysusers.d/gpud.conf"
  install_file 0644 "$SRC/units/tmpfiles.d/gpud.conf" "$LIB_DIR/tmpfiles.d/gpud.conf"
  install_file 0755 "$SRC/scripts/uninstall.sh" "$PREFIX/uninstall.sh"
  install_file 0644 "$SRC/README.md" "$DOC_DIR/README.md"
  for doc in "$SRC"/docs/*.md; do install_file 0644 "$doc" "$DOC_DIR/$(basename "$doc")"; done
  mkdir -p "$BIN_DIR"
  ln -sfn "$PREFIX/current/bin/gpud" "$BIN_DIR/gpud"
  ln -sfn "$PREFIX/current/bin/gpuctl" "$BIN_DIR/gpuctl"
  systemd-sysusers "$LIB_DIR/sysusers.d/gpud.conf"
  systemd-tmpfiles --create "$LIB_DIR/tmpfiles.d/gpud.conf"
  install -d -m 0755 "$ETC_DIR"
  install_config gpud.yaml 0644 "s|^runtime: [a-z]*|runtime: $RUNTIME|; s|^# runtime_socket: [^ ]*|runtime_socket: $ENGINE_SOCKET|"
  install_config models.yaml 0644
  install_config gpud.env 0640  # it may name secrets: readable by root only
  ensure_api_key
  for file in gpud.yml gpud-rules.yml; do install_file 0644 "$SRC/etc/prometheus/$file" "$DOC_DIR/prometheus/$file"; done
  install_file 0644 "$SRC/etc/grafana/gpud.json" "$DOC_DIR/grafana/gpud.json"
}

ensure_api_key() { # /etc/gpud/api-key, once: the public API's key, which the shipped Prometheus config sends too
  local key="$ETC_DIR/api-key"
  if [[ ! -e $key ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$key")
    log "wrote a new API key to $key (gpud.env points INTERNAL_API_KEY_FILE at it)"
  fi
  # Prometheus (Debian's runs as user prometheus) reads the key at each scrape; nobody else may.
  if getent group prometheus >/dev/null; then
    chgrp prometheus "$key" && chmod 0640 "$key"
  fi
}

start_service() { # enable and (re)start; an upgrade restarts a running gpud onto the new release
  local was_active="$1"
  systemctl daemon-reload
  if [[ $START == 0 ]]; then
    systemctl enable gpud.socket gpud.service >&2
    return 0
  fi
  systemctl reset-failed gpud.service gpud.socket 2>/dev/null || true
  systemctl enable --now gpud.socket gpud.service >&2
  if [[ $was_active == active ]]; then
    log "restarting gpud onto the new release"
    systemctl restart gpud.service
  fi
  systemctl is-active --quiet gpud.service || die "gpud did not start: journalctl -u gpud.service -p err"
  log "gpud is running: gpuctl status (as root or a member of group gpud)"
}

main() {
  local release previous="" was_active
  need_python
  [[ -n $WHEELHOUSE || -f $SRC/setup.py ]] || die "no source tree at $SRC and no --wheelhouse"
  release="$PREFIX/releases/$(version)-$(date -u +%Y%m%dT%H%M%S)"
  [[ -e $PREFIX/current ]] && previous="$(readlink -f "$PREFIX/current")"
  log "building $release"
  mkdir -p "$PREFIX/releases"
  build_release "$release" || { rm -rf "$release"; die "could not install gpud into $release"; }
  choose_engine
  was_active="$(systemctl is-active gpud.service 2>/dev/null || true)"
  switch_current "$release"
  install_system_files
  # The same check `gpud run` makes at start (GPUs included): a configuration it refuses is not started.
  if ! (set -a && . "$ETC_DIR/gpud.env" && exec "$PREFIX/current/bin/gpud" check-config >&2); then
    die "gpud refuses $ETC_DIR/gpud.yaml (see above): fix it, then: systemctl restart gpud.service"
  fi
  start_service "$was_active"
  prune_releases "$previous"
  log "installed gpud $(version) ($release)"
}

main
