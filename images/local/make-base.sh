#!/bin/bash
# A local base image from Debian packages: bookworm with Python 3.11 and its venv module, for
# building the images where no container registry can be reached. Kept in podman's store: a second
# call finds it and does nothing.
#
# Usage: make-base.sh [IMAGE]   (default localhost/bookworm-py311)
# Environment:
#   DEBIAN_MIRROR   default http://deb.debian.org/debian
#   DEBOOTSTRAP_CACHE  where debootstrap keeps the .debs it fetched, so a rebuild of the image
#                   downloads nothing (default /var/cache/cascade-rcnn/debootstrap)
#   CONTAINERS_CONF podman's config (default: the one engine.sh writes)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
CONTAINERS_CONF=${CONTAINERS_CONF:-$("$here/engine.sh" config)}
export CONTAINERS_CONF

image=${1:-localhost/bookworm-py311}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${DEBOOTSTRAP_CACHE:-/var/cache/cascade-rcnn/debootstrap}

say() { echo "make-base.sh: $*" >&2; }

if podman image exists "$image"; then
    say "$image is cached ($(podman image inspect --format '{{.Created}}' "$image"))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    say "debootstrap needs root: run as root, or build $image some other way"
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap (apt)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
fi

rootfs=$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$cache"
say "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --cache-dir="$cache" bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"
# What a container never needs: package lists, the .deb cache, docs and man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

say "importing $rootfs as $image"
# The ENV a python:slim image has: the Dockerfiles extend PATH, which must therefore exist.
tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase bookworm with python3, python3-venv, ca-certificates" \
    - "$image" >/dev/null
say "$image: $(podman run --rm "$image" python3 --version)"
