#!/usr/bin/env bash
# Set up everything ckfs needs on a Debian machine: system packages (only
# those missing, with one `apt-get update`), a virtualenv in .venv with ckfs
# installed in editable mode plus the extras named in $CKFS_EXTRAS.
# Idempotent: a second run installs nothing and takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: pyfuse3 builds from source (gcc, pkg-config, libfuse3-dev);
# fuse3 gives fusermount3; umoci/skopeo build and move test images;
# docker-registry, runc and containerd are the real peers tests and
# benchmarks talk to; busybox-static is the example image's userland;
# debootstrap builds the Debian image runc runs in the tests; golang-go and
# the estargz library's Debian sources build the test tree's eStargz
# converter offline (integration/estargz), and stargz-snapshotter is the
# reference lazy snapshotter the benchmarks compare against.
PKGS=(gcc pkg-config fuse3 libfuse3-dev python3-dev python3-venv
      umoci skopeo docker-registry runc containerd busybox-static debootstrap
      golang-go golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter
      git ca-certificates)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "bootstrap: ckfs needs Python >= 3.11 ($PY is $("$PY" -V 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ckfs-installed
want="$(sha256sum pyproject.toml | cut -c1-16) ${CKFS_EXTRAS:-fuse}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip's own chatter goes to a log, shown only when the install fails.
  { .venv/bin/python -m pip install -q --upgrade pip setuptools wheel &&
    .venv/bin/python -m pip install -q -e ".[${CKFS_EXTRAS:-fuse}]"; } >.venv/pip.log 2>&1 \
    || { cat .venv/pip.log >&2; echo "bootstrap: pip install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# Byte-compile ahead of time: with PYTHONDONTWRITEBYTECODE set (as on some
# CI machines) every `ckfs` start would otherwise recompile the package.
.venv/bin/python -m compileall -q -j 0 ckfs snapshotters cmd >/dev/null
