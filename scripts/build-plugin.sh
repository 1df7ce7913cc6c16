#!/bin/sh
# Builds the managed Docker plugin (default calico/cnm:latest) with no image registry:
# a Debian root filesystem made by mmdebstrap from this machine's apt sources, the
# Python dependencies at the versions in .venv, and the project; then
# `docker plugin create`. An existing plugin of that name is replaced keeping its
# settings and its enabled state (the offline upgrade; state is on a host mount).
#
# The root filesystem without the project is cached in $CALICO_CNM_PLUGIN_CACHE
# (default /var/cache/calico-cnm/plugin), keyed by this script, the Debian suite and
# the frozen Python dependencies; a fresh machine builds it (about a minute).
#
# `build-plugin.sh --dir DIR` only assembles the plugin directory (DIR/config.json and
# DIR/rootfs) for `docker plugin create NAME DIR` elsewhere (the tests do).
set -eu
cd "$(dirname "$0")/.."
only_dir=""
if [ "${1:-}" = "--dir" ]; then
    only_dir=${2:?--dir needs a directory}
    [ ! -e "$only_dir" ] || { echo "$only_dir exists" >&2; exit 1; }
fi

PLUGIN=${PLUGIN:-calico/cnm:latest}
CACHE=${CALICO_CNM_PLUGIN_CACHE:-/var/cache/calico-cnm/plugin}
PACKAGES="python3,libstdc++6,iptables,ipset,bird2,iproute2,conntrack,kmod"
PROJECT_PACKAGES="plugin driver ipam_driver profiles routing dataplane datastore"

. /etc/os-release
suite=${VERSION_CODENAME:?cannot tell the Debian suite from /etc/os-release}
sources=/etc/apt/sources.list.d/debian.sources
[ -e "$sources" ] || sources=/etc/apt/sources.list

work=$(mktemp -d "${TMPDIR:-/var/tmp}/calico-cnm-plugin.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

# The dependencies exactly as the tests run them (not the project itself, nor test tools).
.venv/bin/python - > "$work/requirements.txt" <<'PY'
import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement  # installed with pytest

with open("pyproject.toml", "rb") as handle:
    wanted = [Requirement(d) for d in tomllib.load(handle)["project"]["dependencies"]]
seen: set[str] = set()
while wanted:
    requirement = wanted.pop()
    if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
        continue
    dist = md.distribution(requirement.name)
    if dist.metadata["Name"].lower() in seen:
        continue
    seen.add(dist.metadata["Name"].lower())
    print(f"{dist.metadata['Name']}=={dist.version}")
    wanted.extend(Requirement(r) for r in dist.requires or [])
PY
sort -o "$work/requirements.txt" "$work/requirements.txt"

# The key: the recipe below (between its marker lines), the suite, the packages and
# the frozen dependencies.
key=$( { sed -n '/^# ---- recipe/,/^# ---- end of recipe/p' "$0"; echo "$suite $PACKAGES";
         cat "$work/requirements.txt"; } | sha1sum | cut -c1-16)
base="$CACHE/rootfs-$key"
# ---- recipe
if [ ! -d "$base" ]; then
    echo "building the plugin's root filesystem ($suite; cache $base)"
    command -v mmdebstrap >/dev/null || {
        echo "mmdebstrap is missing: run scripts/install-deps.sh" >&2; exit 1; }
    mkdir -p "$CACHE"
    partial="$CACHE/partial-$key.$$"
    rm -rf "$partial"
    mmdebstrap --quiet --variant=essential --include="$PACKAGES" \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$suite" "$partial" "$sources"
    # Same CPython minor version (3.11) inside and here, so the same wheels fit.
    .venv/bin/pip install --quiet --no-deps --target "$partial/usr/lib/calico-cnm" \
        -r "$work/requirements.txt" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
    rm -rf "$partial/usr/lib/calico-cnm/bin"
    # Other keys' root filesystems are old builds: keep only this one.
    find "$CACHE" -mindepth 1 -maxdepth 1 -name 'rootfs-*' -exec rm -rf {} +
    mv "$partial" "$base"
fi
# ---- end of recipe

echo "assembling $PLUGIN"
out="$work/plugin"
[ -z "$only_dir" ] || out=$only_dir
mkdir -p "$out"
cp -al "$base" "$out/rootfs"   # hard links: the cache is never written through
for package in $PROJECT_PACKAGES; do
    cp -r "$package" "$out/rootfs/usr/lib/calico-cnm/"
done
find "$out/rootfs/usr/lib/calico-cnm" -name __pycache__ -prune -exec rm -rf {} +
install -m 755 plugin/rootfs/calico-cnm plugin/rootfs/calico-cnm-plugin \
    "$out/rootfs/usr/local/bin/"
.venv/bin/python - "$PLUGIN" > "$out/config.json" <<'PY'
import json
import sys

with open("plugin/config.json") as handle:
    config = json.load(handle)
for entry in config["env"]:
    if entry["name"] == "CALICO_CNM_PLUGIN_REFERENCE":
        entry["value"] = sys.argv[1]
json.dump(config, sys.stdout, indent=2)
PY
if [ -n "$only_dir" ]; then
    echo "assembled $only_dir"
    exit 0
fi

# Replacing an existing plugin keeps what `docker plugin set` changed and whether it
# was enabled.
settings="$work/settings"
: > "$settings"
was_enabled=false
if docker plugin inspect "$PLUGIN" > "$work/old.json" 2>/dev/null; then
    was_enabled=$(docker plugin inspect -f '{{.Enabled}}' "$PLUGIN")
    # Settable values that differ from the new defaults, one `NAME=VALUE` or
    # `MOUNT.source=PATH` per line.
    .venv/bin/python - "$work/old.json" "$work/plugin/config.json" > "$settings" <<'PY'
import json
import sys

old = json.load(open(sys.argv[1]))[0]["Settings"]
config = json.load(open(sys.argv[2]))
defaults = {e["name"]: e.get("value", "") for e in config["env"]
            if "value" in e.get("settable", [])}
for item in old["Env"]:
    name, _, value = item.partition("=")
    if name in defaults and value != defaults[name]:
        print(f"{name}={value}")
sources = {m["name"]: m["source"] for m in config["mounts"]
           if "source" in m.get("settable", [])}
for mount in old["Mounts"]:
    if mount.get("Name") in sources and mount["Source"] != sources[mount["Name"]]:
        print(f"{mount['Name']}.source={mount['Source']}")
PY
    echo "replacing $PLUGIN (enabled: $was_enabled); keeping $(wc -l < "$settings") setting(s)"
    docker plugin disable -f "$PLUGIN" >/dev/null 2>&1 || true
    docker plugin rm -f "$PLUGIN" >/dev/null
fi
docker plugin create "$PLUGIN" "$work/plugin" >/dev/null
# One `set` per value: a value may hold spaces or commas.
while IFS= read -r setting; do
    docker plugin set "$PLUGIN" "$setting"
done < "$settings"
if [ "$was_enabled" = true ]; then
    docker plugin enable "$PLUGIN"
fi
echo "built $PLUGIN: docker plugin enable $PLUGIN"
