"""NetworkDriver logic: networks and endpoints in the datastore, veths in the kernel.

Every container endpoint is a veth pair whose host end (cali...) is routed: a
host route to each container address, the network's gateway address on the
host end (so the host answers for it) and proxy ARP (so the host answers for
peers in the same subnet). Each network keeps its own subnet and gateway, so
`docker network inspect` is truthful and a container can join several
networks: each interface has its own connected subnet and source address.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import netaddr

from dataplane.netlink import Netlink
from datastore.base import AlreadyExists, Datastore, RevisionConflict, dumps
from datastore.errors import CalicoCnmError, Conflict, InvalidRequest, NotFound
from driver.records import (
    ENDPOINTS,
    NETWORKS,
    EndpointRecord,
    NetworkRecord,
    PortMapping,
    Subnet,
    endpoint_key,
    network_key,
)
from ipam_driver.service import IpamService
from profiles.model import Profile, check_name
from profiles.store import ProfileStore

log = logging.getLogger(__name__)

GENERIC_OPTIONS = "com.docker.network.generic"
INTERNAL_OPTION = "com.docker.network.internal"
PORTMAP_OPTION = "com.docker.network.portmap"
# `-o key=value` options a calico network understands.
SUPPORTED_NETWORK_OPTIONS = ("mtu", "profile")
IP_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
CAS_RETRIES = 20


def _parse_subnet(data: list[dict[str, Any]], family: int) -> Subnet | None:
    if not data:
        return None
    label = "IPv4" if family == 4 else "IPv6"
    if len(data) > 1:
        raise InvalidRequest(f"a calico network takes one {label} subnet, not {len(data)}")
    item = data[0]
    try:
        cidr = netaddr.IPNetwork(str(item.get("Pool", "")))
    except (netaddr.AddrFormatError, ValueError) as exc:
        raise InvalidRequest(f"{label} pool {item.get('Pool')!r} is not a CIDR") from exc
    if cidr.version != family:
        raise InvalidRequest(f"{label} pool {cidr} is of the wrong family")
    if cidr.prefixlen == 0:
        raise InvalidRequest(
            f"{label} pool {cidr} is not a real subnet: use --ipam-driver calico-ipam"
        )
    gateway = None
    if item.get("Gateway"):
        try:
            gateway = str(netaddr.IPNetwork(str(item["Gateway"])).ip)
        except (netaddr.AddrFormatError, ValueError) as exc:
            raise InvalidRequest(f"gateway {item['Gateway']!r} is not an address") from exc
    return Subnet(cidr=str(cidr.cidr), gateway=gateway, pool_id=str(item.get("Pool")))


def _parse_ports(options: dict[str, Any]) -> list[PortMapping]:
    ports: list[PortMapping] = []
    for item in options.get(PORTMAP_OPTION) or []:
        if not isinstance(item, dict):
            raise InvalidRequest(f"{PORTMAP_OPTION} must be a list of objects")
        try:
            numbers = [int(item.get(k) or 0) for k in ("Proto", "HostPort", "Port")]
        except (TypeError, ValueError):
            raise InvalidRequest(f"port mapping {item} has a field that is not a number") \
                from None
        if not all(0 <= n <= 65535 for n in numbers):
            raise InvalidRequest(f"port mapping {item} has a field out of range")
        protocol = IP_PROTOCOLS.get(int(item.get("Proto", 6)))
        if protocol is None:
            raise InvalidRequest(f"port mapping protocol {item.get('Proto')} is not supported")
        host_port = int(item.get("HostPort") or 0)
        if host_port == 0:
            raise InvalidRequest(
                "publishing a port without a host port (docker run -p 80) is not supported; "
                "name the host port, e.g. -p 8080:80"
            )
        # HostPort..HostPortEnd (`-p 8080-8090:80`) is the range Docker may choose one
        # host port from, for this one container port: use its first port.
        ports.append(PortMapping(
            protocol=protocol, container_port=int(item.get("Port", 0)),
            host_port=host_port, host_ip=str(item.get("HostIP") or ""),
        ))
    return ports


def _half_routes(subnet: Subnet) -> list[dict[str, Any]]:
    """IPv6 has no wildcard proxy NDP: route both halves of the subnet via the gateway.

    The gateway itself gets a connected /128 first; otherwise, once the half that
    contains it is routed via it, the kernel finds the gateway unreachable.
    """
    if subnet.gateway is None:
        return []
    network = netaddr.IPNetwork(subnet.cidr)
    if network.prefixlen >= 127:
        return []
    routes: list[dict[str, Any]] = [{"Destination": f"{subnet.gateway}/128", "RouteType": 1}]
    routes += [
        {"Destination": str(half), "RouteType": 0, "NextHop": subnet.gateway}
        for half in network.subnet(network.prefixlen + 1)
    ]
    return routes


class NetworkService:
    def __init__(
        self,
        store: Datastore,
        ipam: IpamService,
        hostname: str,
        netlink_factory: Callable[[], Netlink] = Netlink,
        name_lookup: Callable[[str], str | None] | None = None,
        mtu_for: Callable[[list[str]], int | None] | None = None,
    ) -> None:
        self._store = store
        # The default veth MTU for a network's subnets (uplink less encapsulation).
        self._mtu_for = mtu_for
        self._ipam = ipam
        self._hostname = hostname
        self._netlink_factory = netlink_factory
        self._name_lookup = name_lookup
        self._profiles = ProfileStore(store)

    # Networks

    def create_network(
        self,
        network_id: str,
        options: dict[str, Any],
        ipv4_data: list[dict[str, Any]],
        ipv6_data: list[dict[str, Any]],
    ) -> NetworkRecord:
        generic = options.get(GENERIC_OPTIONS) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"{GENERIC_OPTIONS} must be an object")
        unknown = sorted(set(generic) - set(SUPPORTED_NETWORK_OPTIONS))
        if unknown:
            raise InvalidRequest(
                f"unsupported network option {unknown[0]!r}; calico networks accept: "
                + ", ".join(SUPPORTED_NETWORK_OPTIONS)
            )
        mtu = None
        if generic.get("mtu"):
            try:
                mtu = int(generic["mtu"])
            except ValueError as exc:
                raise InvalidRequest(f"mtu {generic['mtu']!r} is not a number") from exc
            if not 576 <= mtu <= 65535:
                raise InvalidRequest(f"mtu {mtu} is out of range (576 to 65535)")
        profiles = [p.strip() for p in str(generic.get("profile", "")).split(",") if p.strip()]
        for name in profiles:
            try:
                self._profiles.get(name)
            except NotFound:
                raise InvalidRequest(
                    f"profile {name!r} does not exist; create it first with "
                    f"`calico-cnm profile add {name}`"
                ) from None
        ipv4 = _parse_subnet(ipv4_data, 4)
        ipv6 = _parse_subnet(ipv6_data, 6)
        if ipv4 is None and ipv6 is None:
            raise InvalidRequest("a calico network needs an IPv4 or IPv6 subnet")
        record = NetworkRecord(
            id=network_id, ipv4=ipv4, ipv6=ipv6, mtu=mtu, profiles=profiles,
            internal=bool(options.get(INTERNAL_OPTION, False)),
            options={str(k): str(v) for k, v in generic.items()},
            hostname=self._hostname,
        )
        try:
            self._store.create(network_key(network_id), dumps(record.to_dict()))
        except AlreadyExists:
            existing = self.get_network(network_id)
            if existing.to_dict() != record.to_dict():
                raise Conflict(
                    f"network {network_id} already exists with other settings"
                ) from None
        return record

    def resolve_network(self, network_id: str) -> NetworkRecord:
        """Learns the network's Docker name and, unless `-o profile` named profiles,
        gives it the default profile of that name (created if missing, else reused).

        Without a name lookup, or while Docker does not answer, the network stays
        unresolved and its endpoints carry no profile: they fail closed.
        """
        for _ in range(CAS_RETRIES):
            entry = self._store.get(network_key(network_id))
            if entry is None:
                raise NotFound(f"network {network_id} is not a calico network")
            record = NetworkRecord.from_dict(entry.data)
            if record.name or self._name_lookup is None:
                return record
            name = self._name_lookup(network_id)
            if name is None:
                return record
            record.name = name
            record.conflict = self._conflict_with_cluster(record)
            if not record.profiles:
                record.profiles = self._cluster_profiles(record)
            if not record.profiles:
                try:
                    check_name(name, "profile name")
                except InvalidRequest as exc:
                    # Docker allows names (spaces, any length) that cannot name a profile.
                    raise InvalidRequest(
                        f"network {name!r} cannot have a default profile of its name "
                        f"({exc}); recreate it with -o profile=NAME"
                    ) from None
                self._profiles.ensure(Profile.network_default(name))
                record.profiles = [name]
            try:
                self._store.update(network_key(network_id), dumps(record.to_dict()),
                                   entry.revision)
                log.info("network %s is %r with profiles %s", network_id[:12], name,
                         ", ".join(record.profiles))
                return record
            except RevisionConflict:
                continue
        raise Conflict(f"network {network_id} is being changed concurrently; retry")

    def cluster_members(self, name: str) -> list[NetworkRecord]:
        """Every host's network of that name: together, one cluster network."""
        members = []
        for entry in self._store.list(NETWORKS):
            try:
                record = NetworkRecord.from_dict(entry.data)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if record.name == name:
                members.append(record)
        return members

    def _conflict_with_cluster(self, record: NetworkRecord) -> str:
        """Why record cannot join the cluster network of its name ("" when it can)."""
        for other in self.cluster_members(record.name):
            if other.id == record.id or other.conflict or other.removing:
                continue
            if other.subnets != record.subnets:
                theirs = " and ".join(s for s in other.subnets if s)
                ours = " and ".join(s for s in record.subnets if s)
                return (
                    f"calico network {record.name!r} already exists in the cluster with "
                    f"subnet {theirs} (on host {other.hostname}); this host's network of "
                    f"that name has {ours}: remove it and create it again with "
                    f"--subnet {other.subnets[0] or other.subnets[1]}"
                )
        return ""

    def _cluster_profiles(self, record: NetworkRecord) -> list[str]:
        """A network joining a cluster network carries that network's profiles."""
        if record.conflict:
            return []
        for other in self.cluster_members(record.name):
            if other.id != record.id and other.profiles and not other.conflict:
                return list(other.profiles)
        return []

    def resolve_pending_networks(self) -> list[NetworkRecord]:
        """Resolves every network of this host whose name is still unknown; returns
        those resolved (another host's networks are known only to its own Docker).

        A network that cannot be read or resolved is logged and skipped: it must not
        keep the others (or the caller's reconciliation) from going ahead.
        """
        resolved = []
        for entry in self._store.list(NETWORKS):
            try:
                network = NetworkRecord.from_dict(entry.data)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("network record %s is unreadable: %s", entry.key, exc)
                continue
            if network.hostname not in ("", self._hostname):
                continue
            if not network.name:
                try:
                    record = self.resolve_network(network.id)
                except CalicoCnmError as exc:
                    log.warning("network %s stays without a profile: %s", network.id[:12], exc)
                    continue
                if record.name:
                    resolved.append(record)
        return resolved

    def get_network(self, network_id: str) -> NetworkRecord:
        entry = self._store.get(network_key(network_id))
        if entry is None:
            raise NotFound(f"network {network_id} is not a calico network")
        return NetworkRecord.from_dict(entry.data)

    def list_networks(self) -> list[NetworkRecord]:
        return [NetworkRecord.from_dict(e.data) for e in self._store.list(NETWORKS)]

    def delete_network(self, network_id: str) -> bool:
        """Removes this host's network; returns whether the cluster network goes too.

        A network that is part of a cluster network (other hosts have one of its name)
        is removed from every host only while no container on any host uses it: then
        the other hosts' agents are told to remove theirs. Otherwise only this host
        leaves it: dockerd 20.10 ignores a remote driver's refusal of DeleteNetwork
        (it logs "driver error deleting network" and removes the network anyway), so
        refusing would only leave a record behind.
        """
        network = self.get_network(network_id)
        members, users = self._members_and_users(network)
        if users:
            hosts = sorted({e.hostname for e in users})
            label = repr(network.name) if network.name else network_id
            log.warning(
                "network %s was removed from this host's Docker while %d container "
                "endpoint(s) on host(s) %s use it: it stays there (and the network sync "
                "creates it here again)", label, len(users), ", ".join(hosts))
            self._store.delete(network_key(network_id))
            return False
        for member in members:
            if member.id != network_id and not member.removing:
                self._mark_removing(member.id)
        self._store.delete(network_key(network_id))
        return True

    def _members_and_users(
            self, network: NetworkRecord) -> tuple[list[NetworkRecord], list[EndpointRecord]]:
        """The cluster network's members (every host's network of its name) and the
        endpoints on any host that use one of them."""
        members = [network]
        if network.name and not network.conflict:
            members = [m for m in self.cluster_members(network.name)
                       if not m.conflict] or [network]
        ids = {m.id for m in members} | {network.id}
        return members, [e for e in self.list_endpoints() if e.network_id in ids]

    def find_local_network(self, reference: str) -> NetworkRecord | None:
        """This host's calico network that Docker would take `reference` for: its full
        ID, else its name, else a unique ID prefix (Docker's own order)."""
        local = [n for n in self.list_networks() if n.hostname in ("", self._hostname)]
        for matches in ([n for n in local if n.id == reference],
                        [n for n in local if n.name and n.name == reference]):
            if matches:
                return matches[0]
        prefixed = [n for n in local if reference and n.id.startswith(reference)]
        return prefixed[0] if len(prefixed) == 1 else None

    def removal_refusal(self, reference: str) -> str:
        """Why `docker network rm REFERENCE` on this host must be refused ("" if it
        need not): a container on some host still uses the cluster network."""
        network = self.find_local_network(reference)
        if network is None:
            return ""
        _, users = self._members_and_users(network)
        if not users:
            return ""
        hosts = sorted({e.hostname for e in users})
        label = repr(network.name) if network.name else network.id[:12]
        return (f"calico network {label} is in use by {len(users)} container "
                f"endpoint(s) on host(s) {', '.join(hosts)}: stop or disconnect them "
                f"first")

    def disable_refusal(self, plugin: str) -> str:
        """Why disabling this managed plugin must be refused ("" if it need not): this
        host still has calico networks."""
        local = sorted(n.name or n.id[:12] for n in self.list_networks()
                       if n.hostname in ("", self._hostname) and not n.removing)
        if not local:
            return ""
        shown = ", ".join(local[:5]) + (", ..." if len(local) > 5 else "")
        return (f"plugin {plugin} is in use by {len(local)} calico network(s) on this "
                f"host ({shown}): remove them first, or disable with -f")

    def _mark_removing(self, network_id: str) -> None:
        for _ in range(CAS_RETRIES):
            entry = self._store.get(network_key(network_id))
            if entry is None:
                return
            record = NetworkRecord.from_dict(entry.data)
            record.removing = True
            try:
                self._store.update(network_key(network_id), dumps(record.to_dict()),
                                   entry.revision)
                return
            except RevisionConflict:
                continue
        raise Conflict(f"network {network_id} is being changed concurrently; retry")

    # Endpoints

    def _endpoint(self, network_id: str, endpoint_id: str) -> tuple[EndpointRecord, int]:
        entry = self._store.get(endpoint_key(self._hostname, endpoint_id))
        if entry is None:
            raise NotFound(f"endpoint {endpoint_id} does not exist on this host")
        record = EndpointRecord.from_dict(entry.data)
        if record.network_id != network_id:
            raise NotFound(f"endpoint {endpoint_id} is not in network {network_id}")
        return record, entry.revision

    def _update_endpoint(
        self, network_id: str, endpoint_id: str, change: Callable[[EndpointRecord], None]
    ) -> EndpointRecord:
        for _ in range(CAS_RETRIES):
            record, revision = self._endpoint(network_id, endpoint_id)
            before = record.to_dict()
            change(record)
            if record.to_dict() == before:
                return record  # nothing to write (e.g. no published ports): no event
            try:
                self._store.update(
                    endpoint_key(self._hostname, endpoint_id), dumps(record.to_dict()), revision
                )
                return record
            except RevisionConflict:
                continue
        raise Conflict(f"endpoint {endpoint_id} is being changed concurrently; retry")

    def list_endpoints(self, hostname: str | None = None) -> list[EndpointRecord]:
        prefix = ENDPOINTS if hostname is None else f"{ENDPOINTS}{hostname}/"
        return [EndpointRecord.from_dict(e.data) for e in self._store.list(prefix)]

    def create_endpoint(
        self,
        network_id: str,
        endpoint_id: str,
        interface: dict[str, Any],
        options: dict[str, Any],
    ) -> dict[str, Any]:
        network = self.get_network(network_id)
        if not network.name:
            # Docker knows the network by now; the agent retries if it does not answer.
            network = self.resolve_network(network_id)
        if network.conflict:
            raise Conflict(network.conflict)
        ipv4 = self._check_address(interface.get("Address"), network.ipv4, "IPv4")
        ipv6 = self._check_address(interface.get("AddressIPv6"), network.ipv6, "IPv6")
        if ipv4 is None and ipv6 is None:
            raise InvalidRequest(f"endpoint {endpoint_id} has no address")
        # Port mappings are checked now but programmed only once Docker makes this the
        # container's external endpoint (ProgramExternalConnectivity).
        _parse_ports(options)
        record = EndpointRecord(
            id=endpoint_id, network_id=network_id, hostname=self._hostname,
            ipv4=ipv4, ipv6=ipv6, mac=str(interface.get("MacAddress") or ""),
            profiles=list(network.profiles),
        )
        # Handles first: Docker never calls DeleteEndpoint after a failed CreateEndpoint,
        # so nothing may fail once the record is written (it would block network rm).
        for address in record.addresses:
            try:
                self._ipam.assign_handle(address, endpoint_id)
            except NotFound:
                log.warning("address %s of endpoint %s is not managed by calico-ipam",
                            address, endpoint_id)
        try:
            self._store.create(endpoint_key(self._hostname, endpoint_id), dumps(record.to_dict()))
        except AlreadyExists as exc:
            raise Conflict(f"endpoint {endpoint_id} already exists") from exc
        # Docker chose the addresses (and a MAC if any); nothing to add.
        return {}

    @staticmethod
    def _check_address(value: Any, subnet: Subnet | None, label: str) -> str | None:
        if not value:
            return None
        try:
            address = netaddr.IPNetwork(str(value))
        except (netaddr.AddrFormatError, ValueError) as exc:
            raise InvalidRequest(f"{label} address {value!r} is not valid") from exc
        if subnet is None or address.ip not in netaddr.IPNetwork(subnet.cidr):
            raise InvalidRequest(f"{label} address {value} is outside the network's subnet")
        return str(address)

    def remove_stale_endpoint(self, endpoint_id: str) -> tuple[EndpointRecord, list[str]]:
        """Operator clean-up of an endpoint Docker no longer knows (e.g. its container
        was removed while the plugin was down): its veth and routes if it is on this
        host, its record, and every address its handle holds. Takes a unique ID prefix.
        """
        if len(endpoint_id) < 6:
            raise InvalidRequest("give at least 6 characters of the endpoint ID")
        matches = [(e.key, EndpointRecord.from_dict(e.data)) for e in self._store.list(ENDPOINTS)
                   if e.key.rsplit("/", 1)[-1].startswith(endpoint_id)]
        if not matches:
            raise NotFound(f"no endpoint ID starts with {endpoint_id}")
        if len(matches) > 1:
            raise InvalidRequest(f"{len(matches)} endpoints start with {endpoint_id}; "
                                 "give more of the ID")
        key, record = matches[0]
        if record.hostname == self._hostname:
            with self._netlink_factory() as netlink:
                for address in record.addresses:
                    netlink.delete_route(address)
                netlink.delete_link(record.host_ifname)
        self._store.delete(key)
        released = self._ipam.release_handle(record.id)
        log.info("removed stale endpoint %s (%s); released %s", record.id[:12],
                 record.hostname, ", ".join(released) or "no address")
        return record, released

    def remove_stale_network(self, network_id: str) -> bool:
        """Deletes the record of a network Docker no longer has, once no endpoint
        record refers to it. Returns whether it was deleted."""
        if any(e.network_id == network_id for e in self.list_endpoints()):
            return False
        return self._store.delete(network_key(network_id))

    def endpoint_info(self, network_id: str, endpoint_id: str) -> dict[str, Any]:
        record, _ = self._endpoint(network_id, endpoint_id)
        return {
            "HostInterface": record.host_ifname,
            "IPv4": record.ipv4 or "",
            "IPv6": record.ipv6 or "",
            "Joined": record.joined,
        }

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        record, revision = self._endpoint(network_id, endpoint_id)
        with self._netlink_factory() as netlink:
            for address in record.addresses:
                netlink.delete_route(address)
            netlink.delete_link(record.host_ifname)
        try:
            self._store.delete(endpoint_key(self._hostname, endpoint_id), revision)
        except RevisionConflict:
            self._store.delete(endpoint_key(self._hostname, endpoint_id))

    def _delete_link(self, ifname: str) -> None:
        try:
            with self._netlink_factory() as netlink:
                netlink.delete_link(ifname)
        except Exception:
            log.exception("deleting %s failed; the agent will retry", ifname)

    def join(
        self, network_id: str, endpoint_id: str, sandbox_key: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        network = self.get_network(network_id)
        record, _ = self._endpoint(network_id, endpoint_id)
        gateways = [s.gateway for s in (network.ipv4, network.ipv6) if s and s.gateway]
        mtu = network.mtu
        if mtu is None and self._mtu_for is not None:
            mtu = self._mtu_for([s.cidr for s in (network.ipv4, network.ipv6) if s])
        with self._netlink_factory() as netlink:
            netlink.create_veth(record.host_ifname, record.container_ifname, mtu)
            try:
                netlink.configure_host_end(record.host_ifname, gateways)
                for address in record.addresses:
                    netlink.add_route(address, record.host_ifname)
            except Exception:
                netlink.delete_link(record.host_ifname)
                raise

        def mark_joined(r: EndpointRecord) -> None:
            r.state = "joined"

        self._update_endpoint(network_id, endpoint_id, mark_joined)
        reply: dict[str, Any] = {
            "InterfaceName": {"SrcName": record.container_ifname, "DstPrefix": "eth"},
            "DisableGatewayService": True,
        }
        static_routes: list[dict[str, Any]] = []
        if network.ipv4 and network.ipv4.gateway and record.ipv4 and not network.internal:
            reply["Gateway"] = network.ipv4.gateway
        if network.ipv6 and network.ipv6.gateway and record.ipv6:
            static_routes.extend(_half_routes(network.ipv6))
            if not network.internal:
                reply["GatewayIPv6"] = network.ipv6.gateway
        if static_routes:
            reply["StaticRoutes"] = static_routes
        return reply

    def leave(self, network_id: str, endpoint_id: str) -> None:
        # Marked first, so that the agent never restores what is being torn down.
        def mark_left(r: EndpointRecord) -> None:
            r.state = "left"

        record = self._update_endpoint(network_id, endpoint_id, mark_left)
        with self._netlink_factory() as netlink:
            for address in record.addresses:
                netlink.delete_route(address)
        # Deleting a veth waits for the kernel's RCU grace periods (tens of ms) and
        # `docker stop` waits for Leave: delete it in the background. The routes are
        # gone already; DeleteEndpoint and the agent remove the link if this fails.
        threading.Thread(
            target=self._delete_link, args=(record.host_ifname,), daemon=True,
            name=f"delete-{record.host_ifname}",
        ).start()

    def program_external_connectivity(
        self, network_id: str, endpoint_id: str, options: dict[str, Any]
    ) -> None:
        ports = _parse_ports(options)

        def set_ports(r: EndpointRecord) -> None:
            r.ports = ports

        self._update_endpoint(network_id, endpoint_id, set_ports)

    def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None:
        def clear_ports(r: EndpointRecord) -> None:
            r.ports = []

        self._update_endpoint(network_id, endpoint_id, clear_ports)
