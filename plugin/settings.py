"""One typed, validated Settings object: command-line flags > environment > defaults."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import netaddr

from datastore.errors import InvalidRequest

DEFAULT_SQLITE_PATH = "/var/lib/calico-cnm/state.db"
DEFAULT_PLUGIN_DIR = "/run/docker/plugins"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DEFAULT_RUN_DIR = "/run/calico-cnm"
ROUTING_MODES = ("static", "bgp")
WORKLOAD_TO_HOST_ACTIONS = ("drop", "accept", "return")
AUTODETECTION_METHODS = ("first-found", "interface=REGEX", "can-reach=DESTINATION")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
# A Docker plugin reference: [registry/]path[:tag], lower-case path components.
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


@dataclass(frozen=True)
class Settings:
    hostname: str = field(default_factory=socket.gethostname)
    sqlite_path: str = DEFAULT_SQLITE_PATH
    etcd_endpoints: tuple[str, ...] = ()
    etcd_ca_cert: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    etcd_timeout: float = 4.0
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    network_driver_name: str = "calico"
    ipam_driver_name: str = "calico-ipam"
    default_pools: tuple[str, ...] = ("192.168.0.0/16",)
    network_prefix_v4: int = 24
    network_prefix_v6: int = 64
    workers: int = 2
    threads: int = 8
    resync_interval: float = 10.0
    stale_grace: float = 30.0
    workload_to_host: str = "drop"
    log_level: str = "info"
    run_agent: bool = True
    docker_host: str = DEFAULT_DOCKER_HOST
    node_ip: str | None = None
    node_ipv6: str | None = None
    ip_autodetection: str = "first-found"
    ipv6_autodetection: str = "first-found"
    as_number: int | None = None  # None: the cluster's default (`bgp as`)
    sync_networks: bool = True
    node_timeout: float = 30.0
    routing: str = "static"
    run_dir: str = DEFAULT_RUN_DIR
    metrics_address: str | None = None  # HOST:PORT; None: no metrics
    proc_dir: str = "/proc"
    plugin_reference: str | None = None  # a managed plugin's name, e.g. calico/cnm:latest

    @property
    def uses_etcd(self) -> bool:
        return bool(self.etcd_endpoints)

    @property
    def socket_paths(self) -> tuple[str, ...]:
        """One socket per driver name; one for both when the names are equal (a
        managed plugin has a single socket)."""
        names = dict.fromkeys((self.network_driver_name, self.ipam_driver_name))
        return tuple(os.path.join(self.plugin_dir, f"{name}.sock") for name in names)

    @property
    def docker_drivers(self) -> tuple[str, str]:
        """The network and IPAM driver names Docker knows this plugin by."""
        if self.plugin_reference:
            return self.plugin_reference, self.plugin_reference
        return self.network_driver_name, self.ipam_driver_name

    def validate(self) -> Settings:
        if not _NAME.match(self.hostname):
            raise InvalidRequest(f"hostname {self.hostname!r} is not a valid node name")
        for name in (self.network_driver_name, self.ipam_driver_name):
            if not _NAME.match(name):
                raise InvalidRequest(f"driver name {name!r} is not valid")
        for url in self.etcd_endpoints:
            if not re.match(r"^https?://[^/\s]+(:\d+)?/?$", url):
                raise InvalidRequest(
                    f"etcd endpoint {url!r} is not a URL like http://127.0.0.1:2379"
                )
        tls = (self.etcd_cert_file, self.etcd_key_file)
        if any(tls) and not all(tls):
            raise InvalidRequest("--etcd-cert-file and --etcd-key-file go together")
        for pool in self.default_pools:
            try:
                netaddr.IPNetwork(pool)
            except (netaddr.AddrFormatError, ValueError) as exc:
                raise InvalidRequest(f"default pool {pool!r} is not a valid CIDR") from exc
        if not 8 <= self.network_prefix_v4 <= 30:
            raise InvalidRequest("network prefix for IPv4 must be between 8 and 30")
        if not 48 <= self.network_prefix_v6 <= 126:
            raise InvalidRequest("network prefix for IPv6 must be between 48 and 126")
        if self.workers < 1 or self.threads < 1:
            raise InvalidRequest("workers and threads must be at least 1")
        if not 0 < self.etcd_timeout <= 60:
            raise InvalidRequest("etcd timeout must be between 0 and 60 seconds")
        if self.resync_interval <= 0:
            raise InvalidRequest("resync interval must be positive")
        if self.stale_grace < 0:
            raise InvalidRequest("stale grace must not be negative")
        if not re.match(r"^(unix|tcp|http|https)://\S+$", self.docker_host):
            raise InvalidRequest(
                f"docker host {self.docker_host!r} is not a URL like "
                f"{DEFAULT_DOCKER_HOST} or tcp://127.0.0.1:2375"
            )
        for flag, value, version in (("node-ip", self.node_ip, 4),
                                     ("node-ipv6", self.node_ipv6, 6)):
            if value is None:
                continue
            try:
                address = netaddr.IPNetwork(value)
            except (netaddr.AddrFormatError, ValueError) as exc:
                raise InvalidRequest(f"--{flag} {value!r} is not an address") from exc
            if address.version != version:
                raise InvalidRequest(f"--{flag} {value!r} is not an IPv{version} address")
        for flag, method in (("ip-autodetection", self.ip_autodetection),
                             ("ipv6-autodetection", self.ipv6_autodetection)):
            check_autodetection(flag, method)
        if self.as_number is not None and not 1 <= self.as_number <= 4294967295:
            raise InvalidRequest(f"AS number {self.as_number} is out of range (1 to 4294967295)")
        if self.routing not in ROUTING_MODES:
            raise InvalidRequest(
                f"routing {self.routing!r} is not one of {', '.join(ROUTING_MODES)}")
        for label, path in (("run directory", self.run_dir), ("proc directory", self.proc_dir)):
            if not os.path.isabs(path):
                raise InvalidRequest(f"{label} {path!r} is not an absolute path")
        if self.plugin_reference is not None and not _REFERENCE.match(self.plugin_reference):
            raise InvalidRequest(f"plugin reference {self.plugin_reference!r} is not a "
                                 "plugin name like calico/cnm:latest")
        if self.metrics_address is not None:
            host, _, port = self.metrics_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidRequest(f"metrics address {self.metrics_address!r} is not "
                                     "HOST:PORT, like 127.0.0.1:9091")
        if self.node_timeout <= 0:
            raise InvalidRequest("node timeout must be positive")
        if self.workload_to_host not in WORKLOAD_TO_HOST_ACTIONS:
            raise InvalidRequest(
                f"workload-to-host action {self.workload_to_host!r} is not one of "
                + ", ".join(WORKLOAD_TO_HOST_ACTIONS)
            )
        return self


def check_autodetection(flag: str, method: str) -> None:
    """InvalidRequest unless method is first-found, interface=REGEX or can-reach=DEST."""
    if method == "first-found":
        return
    kind, _, value = method.partition("=")
    if kind == "interface" and value:
        try:
            re.compile(value)
        except re.error as exc:
            raise InvalidRequest(f"--{flag}: {value!r} is not a regular expression: {exc}") \
                from None
        return
    if kind == "can-reach" and value:
        try:
            netaddr.IPAddress(value)
        except (netaddr.AddrFormatError, ValueError):
            raise InvalidRequest(f"--{flag}: can-reach needs an address, not {value!r}") \
                from None
        return
    raise InvalidRequest(
        f"--{flag} {method!r} is not one of {', '.join(AUTODETECTION_METHODS)}"
    )


# Settings field -> environment variable. Flags use the same names with dashes.
ENVIRONMENT = {
    "hostname": "CALICO_CNM_HOSTNAME",
    "sqlite_path": "CALICO_CNM_SQLITE_PATH",
    "etcd_endpoints": "ETCD_ENDPOINTS",
    "etcd_ca_cert": "ETCD_CA_CERT_FILE",
    "etcd_cert_file": "ETCD_CERT_FILE",
    "etcd_key_file": "ETCD_KEY_FILE",
    "etcd_timeout": "CALICO_CNM_ETCD_TIMEOUT",
    "plugin_dir": "CALICO_CNM_PLUGIN_DIR",
    "network_driver_name": "CALICO_CNM_NETWORK_DRIVER_NAME",
    "ipam_driver_name": "CALICO_CNM_IPAM_DRIVER_NAME",
    "default_pools": "CALICO_CNM_DEFAULT_POOLS",
    "network_prefix_v4": "CALICO_CNM_NETWORK_PREFIX_V4",
    "network_prefix_v6": "CALICO_CNM_NETWORK_PREFIX_V6",
    "workers": "CALICO_CNM_WORKERS",
    "threads": "CALICO_CNM_THREADS",
    "resync_interval": "CALICO_CNM_RESYNC_INTERVAL",
    "stale_grace": "CALICO_CNM_STALE_GRACE",
    "workload_to_host": "CALICO_CNM_WORKLOAD_TO_HOST",
    "log_level": "CALICO_CNM_LOG_LEVEL",
    "run_agent": "CALICO_CNM_RUN_AGENT",
    "docker_host": "DOCKER_HOST",
    "node_ip": "CALICO_CNM_NODE_IP",
    "node_ipv6": "CALICO_CNM_NODE_IPV6",
    "ip_autodetection": "CALICO_CNM_IP_AUTODETECTION",
    "ipv6_autodetection": "CALICO_CNM_IPV6_AUTODETECTION",
    "as_number": "CALICO_CNM_AS_NUMBER",
    "sync_networks": "CALICO_CNM_SYNC_NETWORKS",
    "node_timeout": "CALICO_CNM_NODE_TIMEOUT",
    "routing": "CALICO_CNM_ROUTING",
    "run_dir": "CALICO_CNM_RUN_DIR",
    "metrics_address": "CALICO_CNM_METRICS_ADDRESS",
    "proc_dir": "CALICO_CNM_PROC_DIR",
    "plugin_reference": "CALICO_CNM_PLUGIN_REFERENCE",
}

HELP = {
    "hostname": "this host's name in the datastore (default: the system hostname)",
    "sqlite_path": f"embedded datastore file (default {DEFAULT_SQLITE_PATH})",
    "etcd_endpoints": "comma-separated etcd v3 URLs; when set, all state lives in etcd",
    "etcd_ca_cert": "CA certificate for etcd TLS",
    "etcd_cert_file": "client certificate for etcd TLS",
    "etcd_key_file": "client key for etcd TLS",
    "etcd_timeout": "seconds a datastore call waits for etcd before it fails (default 4, so "
    "that a driver call answers within Docker's patience and 5 s)",
    "plugin_dir": f"where the plugin sockets go (default {DEFAULT_PLUGIN_DIR})",
    "network_driver_name": "network driver name, i.e. the socket's name (default calico)",
    "ipam_driver_name": "IPAM driver name (default calico-ipam)",
    "default_pools": "comma-separated pools created on first start if none exists for "
    "that IP family ('none' for none; default 192.168.0.0/16)",
    "network_prefix_v4": "size of an IPv4 subnet carved for a network without --subnet "
    "(default 24)",
    "network_prefix_v6": "size of an IPv6 subnet carved for a network without --subnet "
    "(default 64)",
    "workers": "gunicorn worker processes (default 2)",
    "threads": "threads per worker (default 8)",
    "resync_interval": "seconds between full reconciliations of the kernel (default 10)",
    "stale_grace": "seconds an endpoint or network must stay unknown to Docker before "
    "the agent removes its record (default 30)",
    "workload_to_host": "traffic from containers to this host: drop, accept or return "
    "(default drop)",
    "log_level": "debug, info, warning or error (default info)",
    "run_agent": "whether `serve` also runs the per-host agent: true or false (default "
    "true; false when `calico-cnm agent` runs as its own service)",
    "docker_host": f"the Docker API the plugin uses (default {DEFAULT_DOCKER_HOST})",
    "node_ip": "this node's IPv4 address, with its prefix length (default: autodetected)",
    "node_ipv6": "this node's IPv6 address, with its prefix length (default: autodetected)",
    "ip_autodetection": "how to find the node's IPv4 address: first-found, "
    "interface=REGEX or can-reach=DESTINATION (default first-found)",
    "ipv6_autodetection": "the same for IPv6 (default first-found)",
    "as_number": "this node's BGP AS number (default: the cluster's, `bgp as`; "
    "`node set --as` overrides both)",
    "sync_networks": "create every calico network of the cluster in this host's Docker, "
    "and remove it when it is removed elsewhere: true or false (default true)",
    "node_timeout": "seconds without a heartbeat after which a node counts as down "
    "(default 30)",
    "routing": "how routes to other hosts are made: static (the agent programs them) or "
    "bgp (BIRD 2, run by the agent, exchanges them; default static)",
    "run_dir": f"BIRD's configuration and control socket (default {DEFAULT_RUN_DIR})",
    "metrics_address": "serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9091 "
    "(default: off)",
    "proc_dir": "where the host's /proc is, for sysctls (default /proc; the managed "
    "plugin mounts it at /host/proc, since its own /proc/sys is read-only)",
    "plugin_reference": "the name Docker knows a managed plugin by, used as the drivers "
    "of the networks the sync creates (default: the socket names; `make plugin` sets it)",
}


def _convert(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise InvalidRequest(f"{name.replace('_', '-')}: {raw!r} is not a number") from exc
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise InvalidRequest(f"{name.replace('_', '-')}: {raw!r} is not true or false")
    if kind == "tuple[str, ...]":
        if raw.strip().lower() == "none":
            return ()
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one optional flag per setting; unset flags stay None."""
    group = parser.add_argument_group("settings (flags > environment > defaults)")
    for name, env in ENVIRONMENT.items():
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=env,
            help=HELP[name] + f" [env {env}]",
        )


def load(flags: Mapping[str, object] | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """Builds Settings from flags (None = unset), then the environment, then defaults."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, env in ENVIRONMENT.items():
        raw = flags.get(name)
        if raw is None or raw == "":
            raw = environ.get(env)
        if raw is None or raw == "":
            continue  # empty means unset (a managed plugin's env has empty defaults)
        values[name] = _convert(name, str(raw))
    return Settings(**values).validate()  # type: ignore[arg-type]
