#!/bin/sh
# Builds the local test image (busybox and its applet links, plus a static UDP echo
# tool; no registry needed).
set -eu
IMAGE=${1:-calico-cnm-test:2}
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
# busybox has no UDP client or server: add a tiny static one.
gcc -static -O2 -o "$root/bin/udp" "$(dirname "$0")/../tests/e2e/image/udp.c" 2>/dev/null
tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "built $IMAGE"
