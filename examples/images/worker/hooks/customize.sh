#!/bin/sh
# mmdebstrap --customize-hook: $1 is the finished root filesystem.
set -eu
root="$1"
# Mount points for gpud's read-only model cache and the per-session worker socket directory.
mkdir -p "$root/models" "$root/run/gpud-worker"
# Documentation and locales are not needed in a worker and make up a large part of the tarball.
rm -rf "$root/usr/share/doc/"* "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/var/cache/apt/"*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
