#!/usr/bin/env bash
# Build the deployment images from Debian packages with mmdebstrap and import them into Podman and/or Docker.
#
#   scripts/build-deploy-images.sh                          # deploy/image: the gpud image (gpud:latest)
#   scripts/build-deploy-images.sh tests/e2e/host-image     # the end-to-end test's systemd "host"
#   options: --engines podman,docker (default: both, where running)   --force
#
# Like scripts/build-images.sh, no registry is used: a root filesystem is imported. An image dir holds image.conf
# (IMAGE_TAG, SUITE, VARIANT, PACKAGES, CHANGES, WHEELHOUSE) and hooks/customize.sh. With WHEELHOUSE=1 gpud's
# wheelhouse (scripts/wheelhouse.sh) and etc/gpud are copied to /tmp/wheelhouse and /tmp/gpud-etc for the hook.
# Cache: an engine whose tag carries the label gpud.image.hash=<hash of every input> is left alone, and the root
# filesystem is kept as .cache/images/<name>-<hash>.tar; so an unchanged image costs nothing.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(dirname "$(dirname "$SELF")")"
CACHE="$REPO/.cache/images"
ENGINES_DIR="${GPUD_ENGINES_DIR:-/tmp/gpud-engines}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/tests/engines/containers.conf}"
FORCE=0
ENGINES="podman,docker"
DIRS=()
while (($#)); do
  case "$1" in
    --force) FORCE=1; shift ;;
    --engines) ENGINES="$2"; shift 2 ;;
    *) DIRS+=("$1"); shift ;;
  esac
done
((${#DIRS[@]})) || DIRS=("$REPO/deploy/image")

log() { echo "build-deploy-images: $*" >&2; }

podman_cmd() { podman "$@"; }
docker_cmd() {
  local sock="${GPUD_TEST_DOCKER_SOCKET:-$ENGINES_DIR/docker.sock}"
  if [[ -S "$sock" ]]; then docker -H "unix://$sock" "$@"; else docker "$@"; fi
}

sources_hash() { # the files gpud's wheel is built from (what scripts/wheelhouse.sh packs), and etc/gpud
  (cd "$REPO" && git ls-files -co --exclude-standard -- setup.py pyproject.toml README.md gpud gpuctl examples etc/gpud |
    sort | xargs -d '\n' sha256sum 2>/dev/null) | sha256sum | cut -c1-16
}

inputs_hash() { # inputs_hash DIR
  (
    cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum <"$SELF"
    [[ $WHEELHOUSE == 1 ]] && { sources_hash; sha256sum <"$REPO/scripts/wheelhouse.sh"; }
    true
  ) | sha256sum | cut -c1-16
}

wanted_engines() { # the requested engines that are running and lack this hash
  local engine
  for engine in ${ENGINES//,/ }; do
    if ! "${engine}_cmd" info >/dev/null 2>&1; then log "$engine is not running; skipping it"; continue; fi
    if [[ $FORCE == 0 && "$("${engine}_cmd" image inspect --format '{{ index .Config.Labels "gpud.image.hash" }}' \
      "$IMAGE_TAG" 2>/dev/null || true)" == "$1" ]]; then
      log "$engine already has $IMAGE_TAG ($1)"
      continue
    fi
    echo "$engine"
  done
}

build_rootfs() { # build_rootfs DIR OUT.tar
  local dir="$1" out="$2" stage hooks=()
  stage="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$stage'" RETURN
  if [[ $WHEELHOUSE == 1 ]]; then
    "$REPO/scripts/wheelhouse.sh" "$stage/wheelhouse"
    cp -r "$REPO/etc/gpud" "$stage/gpud-etc"
    hooks+=(--customize-hook="copy-in $stage/wheelhouse $stage/gpud-etc /tmp")
  fi
  log "mmdebstrap $SUITE ($VARIANT, +$PACKAGES) -> $out"
  mmdebstrap --quiet --format=tar --variant="$VARIANT" --include="$PACKAGES" "${hooks[@]}" \
    --customize-hook="$dir/hooks/customize.sh \"\$1\"" "$SUITE" "$out.partial"
  mv "$out.partial" "$out"
}

import_into() { # import_into ENGINE TARBALL HASH
  local engine="$1" tarball="$2" hash="$3" changes=() line
  while IFS= read -r line; do [[ -n $line ]] && changes+=(--change "$line"); done <<<"$CHANGES"
  log "importing $IMAGE_TAG into $engine"
  "${engine}_cmd" import "${changes[@]}" --change "LABEL gpud.image.hash=$hash" "$tarball" "$IMAGE_TAG" >/dev/null
}

build_image() { # build_image DIR
  local dir name hash tarball engines
  dir="$(cd "$1" && pwd)"
  name="$(basename "$dir")"
  [[ $name == image ]] && name=gpud
  WHEELHOUSE=0
  # shellcheck source=/dev/null
  source "$dir/image.conf"
  hash="$(inputs_hash "$dir")"
  engines="$(wanted_engines "$hash")"
  [[ -n $engines ]] || return 0
  tarball="$CACHE/$name-$hash.tar"
  mkdir -p "$CACHE"
  if [[ $FORCE == 1 || ! -s $tarball ]]; then
    build_rootfs "$dir" "$tarball"
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tarball")" -delete
  else
    log "cached rootfs $tarball"
  fi
  for engine in $engines; do import_into "$engine" "$tarball" "$hash"; done
}

for dir in "${DIRS[@]}"; do build_image "$dir"; done
