#!/usr/bin/env bash
# A Python base image for `bentoml containerize`, made from Debian packages alone: for a
# machine that cannot pull the stock python image from Docker Hub (where it can, the stock
# image serves and this is not needed). Prints the image's name; reuses it when present.
#   scripts/debian-base-image.sh [NAME:TAG]      (as root, with debootstrap and Docker)
# Bookworm's python3 is 3.11, bentofile.yaml's docker.python_version: the bento's
# Dockerfile makes its virtual environment from the base image's Python.
set -euo pipefail
image=${1:-convtune/python:3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The CAs this machine trusts (a proxy's included): pip, uv and apt in the image's build
# reach PyPI and Debian through the same network as the host.
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# pip: the bento's Dockerfile pip-installs uv, which then makes the environment. The rest
# is what that Dockerfile apt-installs on a Debian base: here once, not in every image build.
debootstrap --variant=minbase \
  --include=python3,python3-pip,ca-certificates,gnupg2,bash,build-essential,git \
  bookworm "$root" "$mirror" >&2
cp "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
# The image is a Python environment of its own, as the stock python image is: pip may
# install into it (PEP 668's marker would refuse the Dockerfile's `pip install uv`).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# uv trusts the system's CA bundle, as pip and apt here do, instead of its built-in roots.
tar -C "$root" -c . |
  docker import --change 'ENV UV_NATIVE_TLS=1' --change 'CMD ["python3"]' - "$image" >&2
echo "$image"
