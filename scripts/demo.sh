#!/usr/bin/env bash
# Set up ckfs on this Debian machine and run its main job on an example
# image built here, offline: build the image with umoci, import it, list it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export CKFS_ROOT=${CKFS_ROOT:-$PWD/example/state}
name=example.local/ckfs/busybox:latest
[ -f example/layout/index.json ] || bash scripts/example-image.sh example/layout latest >/dev/null
.venv/bin/ckfs import --name "$name" example/layout
.venv/bin/ckfs images ls
.venv/bin/ckfs images inspect "$name"
