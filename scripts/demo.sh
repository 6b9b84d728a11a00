#!/usr/bin/env bash
# Set up ckfs on this Debian machine and run its main job, offline:
#   1. build an example image with umoci (from Debian's busybox-static),
#   2. serve it from a local docker-registry on 127.0.0.1,
#   3. `ckfs mount` it lazily (manifests, config, layer indexes; file contents
#      through the FUSE server as they are read), list it with `ckfs mounts ls`
#      and its layers with `ckfs layers`,
#   4. run it with runc from `ckfs bundle`, then unmount and clean up.
# State goes to ./example/ (CKFS_ROOT overrides). The registry, and the ckfsd
# and FUSE server `ckfs mount` starts in the background, are stopped by their
# PIDs when the script ends, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export CKFS_ROOT=${CKFS_ROOT:-$PWD/example/state}
ckfs=.venv/bin/ckfs
work=$PWD/example
mkdir -p "$work"

[ -f "$work/layout/index.json" ] || bash scripts/example-image.sh "$work/layout" latest >/dev/null

# A private registry on a free loopback port.
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg=$work/registry
mkdir -p "$reg"
cat >"$reg/config.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $reg/data}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$reg/config.yml" >"$reg/log" 2>&1 &
registry_pid=$!
mnt=$work/rootfs
bundle=$work/bundle
cleanup() {
  $ckfs umount "$mnt" 2>/dev/null || true
  $ckfs umount "$bundle/rootfs" 2>/dev/null || true
  .venv/bin/python scripts/stop-background.py "$CKFS_ROOT" || true
  kill "$registry_pid" 2>/dev/null || true
  wait "$registry_pid" 2>/dev/null || true
}
trap cleanup EXIT
.venv/bin/python - "$port" <<'EOF'
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("demo: docker-registry did not start")
EOF

name=127.0.0.1:$port/ckfs/busybox:latest
skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$work/layout:latest" "docker://$name"

echo "== ckfs mount $name $mnt (lazy: layer indexes now, file contents as read)"
$ckfs mount "$name" "$mnt"
echo "== the rootfs:"
ls "$mnt" "$mnt/srv/www"
echo "== ckfs mounts ls"
$ckfs mounts ls
echo "== ckfs images ls"
$ckfs images ls
echo "== ckfs layers $name (from the layer indexes; see docs/debugging.md)"
$ckfs layers "$name"
echo "== a second mount finds everything present (no download, no indexing):"
$ckfs umount "$mnt"
time $ckfs mount "$name" "$mnt"

echo "== runc runs it from a bundle:"
$ckfs bundle "$name" "$bundle" >/dev/null
runc run -b "$bundle" "ckfs-demo-$$"
