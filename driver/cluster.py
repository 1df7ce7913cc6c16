"""Cluster networks: what a host's Docker must create or remove so that every host
has every calico network of the cluster (pure; the agent calls the Docker API).

Without Docker's cluster store each host's dockerd has its own networks. The records
of all hosts' networks with one name are one cluster network; a host that lacks a
name gets it created through its own Docker API with the same settings, and a
network removed on one host (its record marks the others ``removing``) is removed
from every other host's Docker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from driver.records import NetworkRecord


@dataclass(frozen=True)
class SubnetSpec:
    cidr: str
    gateway: str | None
    ip_range: str | None = None


@dataclass(frozen=True)
class NetworkSpec:
    """What `docker network create` needs to make the same network on another host."""

    name: str
    ipv4: SubnetSpec | None
    ipv6: SubnetSpec | None
    options: dict[str, str] = field(default_factory=dict)
    internal: bool = False


@dataclass
class SyncActions:
    create: list[NetworkRecord] = field(default_factory=list)  # another host's, as model
    remove: list[NetworkRecord] = field(default_factory=list)  # this host's


def sync_actions(hostname: str, records: Iterable[NetworkRecord],
                 docker_names: set[str]) -> SyncActions:
    """docker_names: every network name this host's Docker has (of any driver)."""
    records = sorted(records, key=lambda r: r.id)
    own = [r for r in records if r.hostname == hostname]
    present = {r.name for r in own if r.name} | docker_names
    actions = SyncActions(remove=[r for r in own if r.removing])
    wanted: dict[str, NetworkRecord] = {}
    for record in records:
        if (record.hostname != hostname and record.name and not record.conflict
                and not record.removing and record.name not in present):
            wanted.setdefault(record.name, record)
    actions.create = list(wanted.values())
    return actions
