#!/usr/bin/env bash
# Build a Python 3.11 base image with no container registry: Debian bookworm from
# Debian's packages (debootstrap), imported into the engine with `docker import`.
# Usage: scripts/make-base-image.sh [TAG]   (default lnsp-base:bookworm)
# Needs root, debootstrap and a running Docker engine. Skips the work when TAG exists.
set -euo pipefail
TAG=${1:-lnsp-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not installed (apt-get install debootstrap)" >&2; exit 2; }
root=$(mktemp -d /var/tmp/lnsp-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$TAG"
docker run --rm "$TAG" python3 --version
