#!/usr/bin/env bash
# Build gpud's worker image(s) from Debian packages with mmdebstrap and import them into Podman and Docker.
#
#   scripts/build-images.sh            # build when inputs changed, import where the tag is stale or missing
#   scripts/build-images.sh --force    # rebuild and re-import regardless of the cache
#
# No image registry is reachable, so images are root filesystems imported with `podman import`/`docker import`.
# Cache: .cache/images/<name>-<hash>.tar, where <hash> covers examples/images/<name>/ and this script.
# Engines: Podman through its local daemonless CLI (same storage as its API service); Docker through $GPUD_TEST_DOCKER_SOCKET (or the private socket), else $DOCKER_HOST or the default
# socket. An engine that is not running is skipped with a note.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(dirname "$(dirname "$SELF")")"
ENGINES_DIR="${GPUD_ENGINES_DIR:-/tmp/gpud-engines}"
CACHE="$REPO/.cache/images"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/tests/engines/containers.conf}"

log() { echo "build-images: $*" >&2; }

podman_cmd() { # podman_cmd ARGS... -> the local podman CLI
  # Podman is daemonless: the API service reads the same storage, so a local import is visible to it. (The
  # podman 4.3 remote client cannot import: it closes the tarball before sending it.)
  podman "$@"
}

docker_cmd() { # docker_cmd ARGS... -> docker against the chosen engine
  local sock="${GPUD_TEST_DOCKER_SOCKET:-$ENGINES_DIR/docker.sock}"
  if [[ -S "$sock" ]]; then docker -H "unix://$sock" "$@"; else docker "$@"; fi
}

inputs_hash() { # inputs_hash DIR -> sha256 over every input file's path and content (ADD sources too), plus this script
  (
    cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum
    for pair in ${ADD:-}; do
      (cd "$REPO/${pair%%=*}" && find . -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum)
    done
    sha256sum <"$SELF"
  ) | sha256sum | cut -c1-16
}

add_files() { # add_files TARBALL -> append each ADD source dir's files (SRC=DEST pairs) under DEST, readable by all
  local tarball="$1" pair src dest
  for pair in ${ADD:-}; do
    src="$REPO/${pair%%=*}" dest="${pair#*=}"
    log "adding $src as /$dest"
    tar --append --file="$tarball" --owner=0 --group=0 --mode='a+rX' --exclude=__pycache__ -C "$src" \
      --transform "s,^\.,$dest," .
  done
}

build_rootfs() { # build_rootfs DIR OUT.tar -> mmdebstrap the root filesystem described by DIR/image.conf
  local dir="$1" out="$2" tmp
  tmp="$(dirname "$out")/.partial-$(basename "$out")"
  log "mmdebstrap $SUITE ($VARIANT, +$PACKAGES) -> $out"
  # Debian's own apt sources of this machine are used (no mirror argument), since only they are reachable.
  mmdebstrap --quiet --format=tar --variant="$VARIANT" --include="$PACKAGES" \
    --customize-hook="$dir/hooks/customize.sh \"\$1\"" \
    "$SUITE" "$tmp"
  add_files "$tmp"
  mv "$tmp" "$out"  # atomic: an interrupted build never leaves a tarball that looks complete
}

current_hash() { # current_hash ENGINE TAG -> the gpud.image.hash label of TAG in ENGINE, or nothing
  "${1}_cmd" image inspect --format '{{ index .Config.Labels "gpud.image.hash" }}' "$2" 2>/dev/null || true
}

import_into() { # import_into ENGINE TARBALL TAG HASH
  local engine="$1" tarball="$2" tag="$3" hash="$4"
  if ! "${engine}_cmd" info >/dev/null 2>&1; then log "$engine is not running; skipping it"; return 0; fi
  if [[ $FORCE == 0 && "$(current_hash "$engine" "$tag")" == "$hash" ]]; then
    log "$engine already has $tag ($hash)"
    return 0
  fi
  log "importing $tag into $engine"
  local out
  if ! out="$("${engine}_cmd" import --change "CMD $CMD" --change "LABEL gpud.image.hash=$hash" \
    --change "ENV PYTHONUNBUFFERED=1" "$tarball" "$tag" 2>&1)"; then
    log "import into $engine failed: $out"
    return 1
  fi
}

build_image() { # build_image DIR
  local dir="$1" name hash tarball
  name="$(basename "$dir")"
  # shellcheck source=/dev/null
  source "$dir/image.conf"
  hash="$(inputs_hash "$dir")"
  tarball="$CACHE/$name-$hash.tar"
  mkdir -p "$CACHE"
  if [[ $FORCE == 1 || ! -s "$tarball" ]]; then
    build_rootfs "$dir" "$tarball"
    # Older builds of this image are stale now; keep only the current one.
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tarball")" -delete
  else
    log "cached rootfs $tarball"
  fi
  import_into podman "$tarball" "$IMAGE_TAG" "$hash"
  import_into docker "$tarball" "$IMAGE_TAG" "$hash"
}

for dir in "$REPO"/examples/images/*/; do
  [[ -f "$dir/image.conf" ]] && build_image "${dir%/}"
done
