#!/usr/bin/env bash
# Builds the images utmem/hostd and utmem/redis (redis-server with the module) from this
# checkout: the Rust binaries are built on this machine (release) and copied in; the base
# is a local Debian 12 image (no registry needed). Starts and stops its own dockerd when
# none runs (start one first to use the images: `dockerd &`). Then:
# `docker-compose -f docker/docker-compose.yml up -d`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_PREFIX=build
. docker/lib.sh
[ "$(id -u)" -eq 0 ] || { say "run as root (dockerd, apt)"; exit 1; }

docker_tools
trap docker_stop EXIT
docker_start
build_images
docker images 'utmem/*' >&2
