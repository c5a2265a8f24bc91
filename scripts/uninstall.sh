#!/usr/bin/env bash
# Remove gpud as scripts/install.sh installed it (a copy of this script is /opt/gpud/uninstall.sh). Run as root.
#
#   sudo /opt/gpud/uninstall.sh            # stop gpud (its worker containers go with it), remove the program, units,
#                                          # links and docs; keep /etc/gpud, /var/lib/gpud (model cache) and group gpud
#   sudo /opt/gpud/uninstall.sh --purge    # also remove /etc/gpud, /var/lib/gpud and the gpud group
set -euo pipefail

PURGE=0
case "${1:-}" in
  "") ;;
  --purge) PURGE=1 ;;
  *) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
[[ $(id -u) -eq 0 ]] || { echo "uninstall: run as root" >&2; exit 1; }
log() { echo "uninstall: $*" >&2; }

if [[ -d /run/systemd/system ]]; then
  # gpud's own stop removes every worker container it started, so nothing is left on the engine.
  systemctl disable --now gpud.service gpud.socket >&2 2>/dev/null || true
fi
rm -f /usr/local/lib/systemd/system/gpud.service /usr/local/lib/systemd/system/gpud.socket \
  /usr/local/lib/sysusers.d/gpud.conf /usr/local/lib/tmpfiles.d/gpud.conf
for link in /usr/local/bin/gpud /usr/local/bin/gpuctl; do
  [[ -L $link && $(readlink "$link") == /opt/gpud/* ]] && rm -f "$link"
done
rm -rf /usr/local/share/doc/gpud /opt/gpud /run/gpud
remove_tree() { # remove_tree DIR -> gone; a mount point (a model cache disk) is emptied instead
  if mountpoint -q "$1"; then find "$1" -mindepth 1 -maxdepth 1 -exec rm -rf {} +; else rm -rf "$1"; fi
}
if [[ $PURGE == 1 ]]; then
  remove_tree /etc/gpud
  remove_tree /var/lib/gpud
  getent group gpud >/dev/null && groupdel gpud
  log "removed gpud, its configuration, state, model cache and group"
else
  log "removed gpud; kept /etc/gpud, /var/lib/gpud and group gpud (--purge removes them)"
fi
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl reset-failed gpud.service gpud.socket 2>/dev/null || true
fi
