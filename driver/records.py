"""Network and endpoint records as kept in the datastore."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from datastore.base import ROOT

NETWORKS = ROOT + "networks/"
ENDPOINTS = ROOT + "endpoints/"

HOST_IFNAME_PREFIX = "cali"
CONTAINER_IFNAME_PREFIX = "tmp"
# Interface names are limited to 15 characters: prefix + 11 of the endpoint ID.
IFNAME_ID_CHARS = 11


def split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored record's fields this version knows, and the rest (a newer version's,
    during a rolling upgrade), which is kept and written back unchanged."""
    known = {f.name for f in fields(cls)} - {"unknown"}
    return ({k: v for k, v in data.items() if k in known},
            {k: v for k, v in data.items() if k not in known})


def network_key(network_id: str) -> str:
    return NETWORKS + network_id


def endpoint_key(hostname: str, endpoint_id: str) -> str:
    return f"{ENDPOINTS}{hostname}/{endpoint_id}"


def host_ifname(endpoint_id: str) -> str:
    return HOST_IFNAME_PREFIX + endpoint_id[:IFNAME_ID_CHARS]


def container_ifname(endpoint_id: str) -> str:
    return CONTAINER_IFNAME_PREFIX + endpoint_id[:IFNAME_ID_CHARS]


@dataclass
class Subnet:
    """One address family of a network: its subnet and gateway (no prefix)."""

    cidr: str
    gateway: str | None
    pool_id: str = ""


@dataclass
class NetworkRecord:
    id: str
    ipv4: Subnet | None
    ipv6: Subnet | None
    mtu: int | None = None
    # The profiles its endpoints carry, in order: `-o profile=...`, else (once the
    # name is known) the default profile named after the network.
    profiles: list[str] = field(default_factory=list)
    internal: bool = False
    options: dict[str, str] = field(default_factory=dict)
    # Docker's name for it: not in any request; looked up from the Docker API.
    name: str = ""
    # The host whose dockerd created it (networks have local scope; the records of
    # all hosts with one name are one cluster network).
    hostname: str = ""
    # Why this host's network of that name cannot be the cluster's (its endpoints are
    # refused with this message); empty when it is.
    conflict: str = ""
    # Set when the network was removed on another host: this host's agent removes it
    # from its Docker too.
    removing: bool = False
    # Fields of a newer version, written back as they were.
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def subnets(self) -> tuple[str | None, str | None]:
        return (self.ipv4.cidr if self.ipv4 else None, self.ipv6.cidr if self.ipv6 else None)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {**values.pop("unknown"), **values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkRecord:
        _, unknown = split_known(cls, data)
        return cls(
            id=data["id"],
            ipv4=Subnet(**split_known(Subnet, data["ipv4"])[0]) if data.get("ipv4") else None,
            ipv6=Subnet(**split_known(Subnet, data["ipv6"])[0]) if data.get("ipv6") else None,
            mtu=data.get("mtu"),
            profiles=list(data.get("profiles", [])),
            internal=bool(data.get("internal", False)),
            options=dict(data.get("options", {})),
            name=str(data.get("name", "")),
            hostname=str(data.get("hostname", "")),
            conflict=str(data.get("conflict", "")),
            removing=bool(data.get("removing", False)),
            unknown=unknown,
        )


@dataclass
class PortMapping:
    protocol: str
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass
class EndpointRecord:
    id: str
    network_id: str
    hostname: str
    ipv4: str | None  # address with the subnet's prefix, e.g. "10.201.0.5/24"
    ipv6: str | None
    mac: str = ""
    # "created" (CreateEndpoint; Join may be under way), "joined", "left" (Leave).
    state: str = "created"
    profiles: list[str] = field(default_factory=list)
    ports: list[PortMapping] = field(default_factory=list)
    # Fields of a newer version, written back as they were.
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def host_ifname(self) -> str:
        return host_ifname(self.id)

    @property
    def container_ifname(self) -> str:
        return container_ifname(self.id)

    @property
    def joined(self) -> bool:
        return self.state == "joined"

    @property
    def addresses(self) -> list[str]:
        """The endpoint's addresses without prefix."""
        return [a.split("/")[0] for a in (self.ipv4, self.ipv6) if a]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {**values.pop("unknown"), **values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointRecord:
        values, unknown = split_known(cls, data)
        values["ports"] = [PortMapping(**split_known(PortMapping, p)[0])
                           for p in data.get("ports", [])]
        return cls(**values, unknown=unknown)
