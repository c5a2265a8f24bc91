#!/usr/bin/env bash
# Prepare a fresh Debian machine for gpud development: the engines and tools from apt (only what is missing),
# and a virtual environment in .venv with gpud installed editable plus its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(podman runc docker.io docker-compose mmdebstrap curl util-linux procps prometheus etcd-server etcd-client)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # The fleet and monitoring tests start their own etcd members and Prometheus; the services Debian starts at
  # install under systemd would hold ports 2379 and 9090 and keep running: stop what this install started.
  if [[ -d /run/systemd/system ]]; then
    for pair in etcd-server:etcd prometheus:prometheus; do
      if [[ " ${missing[*]} " == *" ${pair%%:*} "* ]]; then $SUDO systemctl disable --now "${pair#*:}.service" || true; fi
    done
  fi
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when packaging inputs changed since the last install.
stamp=.venv/.gpud-installed
want="$(sha256sum setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  # gpud once required the deprecated `pynvml` package, whose import hook warns on every start; nvidia-ml-py
  # (now required) ships the same module, so a venv made before the switch drops the old package.
  if .venv/bin/pip show -q pynvml >/dev/null 2>&1; then
    .venv/bin/pip uninstall -q -y pynvml
  fi
  echo "$want" >"$stamp"
fi
