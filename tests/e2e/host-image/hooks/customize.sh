#!/bin/sh
# mmdebstrap --customize-hook: $1 is the finished root filesystem of the end-to-end test's host.
set -eu
root="$1"
# Nothing the test does not need is started at boot (faster boot, quieter journal).
for unit in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
  e2scrub_all.timer fstrim.timer; do
  rm -f "$root/etc/systemd/system/"*/"$unit"
done
# Keep the whole journal in memory: the test reads it with journalctl.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' >"$root/etc/systemd/journald.conf.d/e2e.conf"
rm -rf "$root/usr/share/doc/"* "$root/usr/share/man/"* "$root/var/cache/apt/"*
