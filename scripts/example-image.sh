#!/usr/bin/env bash
# Build the example image as an OCI layout with umoci, offline, from Debian's
# busybox-static: a small but real userland (sh, ls, cat) in two layers plus
# a layer that deletes a file, so imports, unpacks and mounts have something
# honest to chew on.
#
# Usage: scripts/example-image.sh LAYOUT_DIR [TAG]
set -euo pipefail
out=${1:?usage: example-image.sh LAYOUT_DIR [TAG]}
tag=${2:-latest}
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "example-image: busybox-static is not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootless=(); [ "$(id -u)" -eq 0 ] || rootless=(--rootless)

rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:$tag"

# Layer 1: busybox and its applet links.
base="$work/base"
mkdir -p "$base/bin" "$base/etc" "$base/tmp" "$base/root"
cp "$busybox" "$base/bin/busybox"
for applet in sh ls cat echo mkdir rm cp mv ln id uname sleep true false env stat; do
  ln -s busybox "$base/bin/$applet"
done
chmod 1777 "$base/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$base/etc/passwd"
printf 'root:x:0:\n' > "$base/etc/group"
umoci insert "${rootless[@]}" --image "$out:$tag" "$base" /

# Layer 2: the image's identity and a little data.
app="$work/app"
mkdir -p "$app/etc" "$app/srv/www"
cat > "$app/etc/os-release" <<'OSR'
NAME="ckfs example"
ID=ckfs-example
PRETTY_NAME="ckfs example (busybox)"
OSR
echo "hello from ckfs" > "$app/srv/www/index.html"
echo "scratch" > "$app/srv/www/scratch.txt"
umoci insert "${rootless[@]}" --image "$out:$tag" "$app" /

# Layer 3: a deletion, carried as an OCI whiteout.
umoci insert "${rootless[@]}" --image "$out:$tag" --whiteout /srv/www/scratch.txt

umoci config --image "$out:$tag" \
  --config.cmd /bin/sh --config.cmd -c --config.cmd 'cat /etc/os-release' \
  --config.env PATH=/bin --config.workingdir / \
  --author ckfs
umoci gc --layout "$out"
