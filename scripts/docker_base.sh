#!/usr/bin/env bash
# Make a Debian bookworm + Python 3.11 base image locally, for machines that reach no image registry
# (only Debian's packages): debootstrap a minimal root, then `docker import` it. It stands in for
# python:3.11-slim-bookworm (same Debian, same Python minor); Dockerfile.cpu takes it via PYTHON_IMAGE.
#   scripts/docker_base.sh [TAG]        (default ctxsteer/base:bookworm-py311; needs root)
set -euo pipefail
TAG=${1:-ctxsteer/base:bookworm-py311}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$TAG" > /dev/null 2>&1; then
    echo "base image $TAG exists"
    exit 0
fi
command -v debootstrap > /dev/null || apt-get install -y -q debootstrap > /dev/null
ROOT=$(mktemp -d /var/tmp/ctxsteer-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
chmod 755 "$ROOT"  # it becomes the image's "/": mktemp's 0700 would lock every non-root user out
echo "debootstrap bookworm -> $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" \
    > "$ROOT.log" 2>&1 || { tail -20 "$ROOT.log"; exit 1; }
rm -f "$ROOT.log"
# The host's CA bundle: where PyPI is reached through a TLS-inspecting proxy, its CA is only there.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
ln -sf /usr/bin/python3 "$ROOT/usr/local/bin/python"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" > /dev/null
echo "made $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
