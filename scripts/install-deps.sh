#!/bin/sh
# Installs what calico-cnm needs on a Debian machine: system packages, then a
# virtualenv at .venv with the project installed (editable). Idempotent.
set -eu
cd "$(dirname "$0")/.."

PACKAGES="docker.io iptables ipset iproute2 conntrack etcd-server busybox-static docker-compose gcc libc6-dev make iperf3 bird2 systemd mmdebstrap"
missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
