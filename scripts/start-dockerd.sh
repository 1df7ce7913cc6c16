#!/bin/sh
# Starts Debian's dockerd in the background unless a Docker daemon already answers.
set -eu
if docker info >/dev/null 2>&1; then
    exit 0
fi
mkdir -p /var/log
echo "starting dockerd (log: /var/log/calico-cnm-dockerd.log)"
nohup /usr/sbin/dockerd >/var/log/calico-cnm-dockerd.log 2>&1 &
i=0
until docker info >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 60 ]; then
        echo "dockerd did not start; see /var/log/calico-cnm-dockerd.log" >&2
        exit 1
    fi
    sleep 0.5
done
