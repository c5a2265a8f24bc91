#!/bin/sh
# mmdebstrap --customize-hook: $1 is the finished root filesystem, $1/tmp/wheelhouse holds gpud's wheels and
# $1/tmp/gpud-etc the shipped configuration (etc/gpud).
set -eu
root="$1"
# A clean environment: the build machine's PIP_* settings must not reach the image's pip.
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$root" "$@"; }
in_root python3 -m venv /opt/gpud
in_root /opt/gpud/bin/pip install --quiet --no-index --find-links /tmp/wheelhouse gpud
in_root /opt/gpud/bin/gpud version
# The shipped configuration; a deployment mounts its own /etc/gpud over it, or sets GPUD_* variables.
mkdir -p "$root/etc/gpud"
cp "$root/tmp/gpud-etc/gpud.yaml" "$root/tmp/gpud-etc/models.yaml" "$root/etc/gpud/"
# Mount points: the engine socket, state and model cache, the admin socket's directory.
mkdir -p "$root/run/podman" "$root/var/lib/gpud" "$root/run/gpud"
rm -rf "$root/tmp/wheelhouse" "$root/tmp/gpud-etc" "$root/root/.cache"
rm -rf "$root/usr/share/doc/"* "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/var/cache/apt/"*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
