#!/bin/sh
# Builds the local test image (busybox and its applet links; no registry needed).
set -eu
IMAGE=${1:-calico-cnm-test:latest}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "built $IMAGE"
