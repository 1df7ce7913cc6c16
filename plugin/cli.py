"""The `calico-cnm` command line: serve the plugin, run the agent, manage pools
and inspect IPAM. Commands talk to the datastore directly, like calicoctl."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from datastore.base import Datastore, DatastoreError
from datastore.errors import CalicoCnmError
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from ipam_driver.block_format import REFRESH_SECONDS, read_block_format
from ipam_driver.pools import ENCAP_MODES
from plugin import settings as settings_module
from plugin.bgp_cli import add_bgp_commands
from plugin.compose import build_ipam, build_network_service, host_netlink, open_datastore
from plugin.node_cli import add_node_commands
from plugin.output import table
from plugin.profile_cli import add_profile_commands, profile_argv
from plugin.settings import Settings
from plugin.systemd import DEFAULT_UNIT_DIR, ENV_FILE, install_service


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _as_dict(item: Any) -> Any:
    return dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item


# Commands: each takes (settings, store, args) and returns an exit code.


def cmd_pool_add(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    pool = build_ipam(settings, store).add_pool(
        args.cidr, ipip=args.ipip, nat_outgoing=args.nat_outgoing,
        disabled=args.disabled, block_size=args.block_size,
        ipip_mode=args.ipip_mode, vxlan_mode=args.vxlan_mode,
    )
    print(f"added pool {pool.cidr}")
    return 0


def cmd_pool_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    build_ipam(settings, store).remove_pool(args.cidr)
    print(f"removed pool {args.cidr}")
    return 0


def cmd_pool_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    usages = build_ipam(settings, store).list_pools()
    if args.output == "json":
        _print_json([_as_dict(u) for u in usages])
        return 0
    rows = []
    for usage in usages:
        pool = usage.pool
        rows.append([
            pool.cidr, pool.ipip_mode, pool.vxlan_mode, "yes" if pool.nat_outgoing else "no",
            "yes" if pool.disabled else "no", f"/{pool.block_size}",
            f"{usage.allocated}/{usage.capacity}",
        ])
    print(table(["CIDR", "IPIP", "VXLAN", "NAT-OUTGOING", "DISABLED", "BLOCK", "IN USE"],
                rows))
    return 0


def subnet_reservations(settings: Settings, store: Datastore) -> list[dict[str, Any]]:
    """Every subnet reservation with the networks (by host) that have its subnet."""
    ipam = build_ipam(settings, store)
    networks = build_network_service(settings, store, ipam).list_networks()
    rows: list[dict[str, Any]] = []
    now = time.time()
    for _, rec in ipam.reservations():
        owners = sorted(f"{n.name or n.id[:12]}@{n.hostname or '?'}" for n in networks
                        if rec.cidr in n.subnets)
        rows.append({
            "subnet": rec.cidr, "ip_range": rec.sub_pool, "pool": rec.pool,
            "hosts": list(rec.hosts), "networks": owners,
            "age_seconds": round(now - rec.created_at) if rec.created_at else None,
            "state": "in use" if owners else "no network record",
        })
    return rows


def _age(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_ipam_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    if args.subnets:
        reservations = subnet_reservations(settings, store)
        if args.output == "json":
            _print_json(reservations)
            return 0
        print(table(["SUBNET", "IP-RANGE", "POOL", "HOSTS", "NETWORKS", "AGE", "STATE"],
                    [[r["subnet"], r["ip_range"] or "-", r["pool"],
                      ",".join(r["hosts"]) or "-", ",".join(r["networks"]) or "-",
                      _age(r["age_seconds"]), r["state"]] for r in reservations]))
        return 0
    allocations = build_ipam(settings, store).list_allocations()
    if args.output == "json":
        _print_json([_as_dict(a) for a in allocations])
        return 0
    rows = [[a.address, a.subnet, a.kind, a.handle or "-", a.host or "-"] for a in allocations]
    print(table(["ADDRESS", "SUBNET", "KIND", "HANDLE", "HOST"], rows))
    return 0


def cmd_ipam_release(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    released = build_ipam(settings, store).release_handle(args.handle)
    print(f"released {len(released)} address(es): {' '.join(released) or '-'}")
    return 0 if released else 1


def cmd_ipam_block_format(settings: Settings, store: Datastore, args: argparse.Namespace
                          ) -> int:
    if args.format is None:
        current = read_block_format(store)
        print(f"block format {current}" if current is not None else
              "block format not decided yet (no block written): a first block makes it 2")
        return 0
    if args.format == 1:
        print(f"setting block format 1; waiting {REFRESH_SECONDS + 1:.0f} s for every "
              "process to see it, then rewriting format 2 blocks", flush=True)
    rewritten = build_ipam(settings, store).set_block_format(args.format)
    print(f"block format {args.format}" + (f"; {rewritten} block(s) rewritten in format 1"
                                           if args.format == 1 else ""))
    return 0


def cmd_network_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    networks = [NetworkRecord.from_dict(e.data) for e in store.list(NETWORKS)]
    if args.output == "json":
        _print_json([n.to_dict() for n in networks])
        return 0
    rows = [[
        n.id[:12], n.ipv4.cidr if n.ipv4 else "-", n.ipv4.gateway if n.ipv4 else "-",
        n.ipv6.cidr if n.ipv6 else "-", ",".join(n.profiles) or "-",
    ] for n in networks]
    print(table(["NETWORK", "IPV4 SUBNET", "GATEWAY", "IPV6 SUBNET", "PROFILES"], rows))
    return 0


def cmd_endpoint_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    endpoints = [EndpointRecord.from_dict(e.data) for e in store.list(ENDPOINTS)]
    if args.output == "json":
        _print_json([e.to_dict() for e in endpoints])
        return 0
    rows = [[
        e.id[:12], e.network_id[:12], e.hostname, e.host_ifname, e.ipv4 or "-", e.ipv6 or "-",
        "yes" if e.joined else "no",
    ] for e in endpoints]
    print(table(["ENDPOINT", "NETWORK", "HOST", "INTERFACE", "IPV4", "IPV6", "JOINED"], rows))
    return 0


def cmd_endpoint_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    service = build_network_service(settings, store, build_ipam(settings, store))
    record, released = service.remove_stale_endpoint(args.endpoint_id)
    print(f"removed endpoint {record.id} of network {record.network_id[:12]} on "
          f"{record.hostname}; released {' '.join(released) or 'no address'}")
    return 0


def cmd_uninstall(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    from dataplane.netlink import RTPROT_BIRD
    from profiles.iptables import PolicyWriter
    from routing.bird_process import BirdSupervisor
    from routing.planner import VXLAN_DEVICE

    local = [e for e in (EndpointRecord.from_dict(x.data) for x in store.list(ENDPOINTS))
             if e.hostname == settings.hostname]
    if local and not args.force:
        print(f"error: {len(local)} endpoint(s) on this host would lose their policy "
              "(their traffic would follow Docker's rules); stop their containers or "
              "pass --force", file=sys.stderr)
        return 1
    PolicyWriter().remove_all()
    bird = BirdSupervisor(settings.run_dir)
    bird.stop(graceful=False)
    with host_netlink(settings)() as netlink:
        routes = netlink.list_routes() + netlink.list_routes(protocol=RTPROT_BIRD)
        for route in netlink.list_routes():
            netlink.remove_route(route)
        for route in netlink.list_routes(protocol=RTPROT_BIRD):
            netlink.remove_route(route, protocol=RTPROT_BIRD)
        netlink.delete_link(VXLAN_DEVICE)
    bird.forget()
    print(f"removed every cali- chain, set and hook, BIRD, {len(routes)} route(s) of ours "
          f"and {VXLAN_DEVICE} from this host")
    return 0


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    settings_module.add_arguments(common)
    parser = argparse.ArgumentParser(
        prog="calico-cnm",
        description="Calico layer-3 networking for Docker (network + IPAM plugin).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", parents=[common],
                        help="serve the plugin on the Docker plugin sockets (with the agent)")
    commands.add_parser("agent", parents=[common],
                        help="run only the per-host agent that reconciles the kernel")

    pool = commands.add_parser("pool", help="IP pools that networks draw from")
    pool_commands = pool.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    add = pool_commands.add_parser("add", parents=[common], help="add a pool")
    add.add_argument("cidr")
    add.add_argument("--ipip", action="store_true", help="the same as --ipip-mode always")
    add.add_argument("--ipip-mode", choices=ENCAP_MODES, default=None,
                     help="IP-in-IP towards other hosts: always, only to hosts on another "
                     "subnet (cross-subnet), or never (default)")
    add.add_argument("--vxlan-mode", choices=ENCAP_MODES, default=None,
                     help="VXLAN towards other hosts: always, cross-subnet or never (default)")
    add.add_argument("--nat-outgoing", action="store_true",
                     help="masquerade traffic leaving every pool")
    add.add_argument("--disabled", action="store_true",
                     help="keep the pool but carve no new networks from it")
    add.add_argument("--block-size", type=int, default=None,
                     help="prefix length of allocation blocks (default 26, IPv6 122)")
    add.set_defaults(handler=cmd_pool_add)
    remove = pool_commands.add_parser("remove", parents=[common],
                                      help="remove a pool that has nothing in use")
    remove.add_argument("cidr")
    remove.set_defaults(handler=cmd_pool_remove)
    show = pool_commands.add_parser("show", parents=[common], help="list pools with usage")
    _output_flag(show)
    show.set_defaults(handler=cmd_pool_show)

    ipam = commands.add_parser("ipam", help="address allocations")
    ipam_commands = ipam.add_subparsers(dest="ipam_command", required=True, metavar="ACTION")
    ipam_show = ipam_commands.add_parser("show", parents=[common],
                                         help="list allocated addresses and their handles")
    _output_flag(ipam_show)
    ipam_show.add_argument("--subnets", action="store_true",
                           help="list the network subnet reservations instead: their "
                                "networks, hosts and age (one the agent has not matched "
                                "to a network is released after the stale grace)")
    ipam_show.set_defaults(handler=cmd_ipam_show)
    release = ipam_commands.add_parser("release", parents=[common],
                                       help="release every address held by a handle (a leak)")
    release.add_argument("--handle", required=True)
    release.set_defaults(handler=cmd_ipam_release)
    block_format = ipam_commands.add_parser(
        "block-format", parents=[common],
        help="show or set the allocation block record format (2 is compact; versions "
             "before it read only 1: set 1 before going back to one)")
    block_format.add_argument("format", nargs="?", type=int, choices=(1, 2))
    block_format.set_defaults(handler=cmd_ipam_block_format)

    network = commands.add_parser("network", help="calico networks known to the datastore")
    network_commands = network.add_subparsers(dest="network_command", required=True,
                                              metavar="ACTION")
    network_show = network_commands.add_parser("show", parents=[common])
    _output_flag(network_show)
    network_show.set_defaults(handler=cmd_network_show)

    endpoint = commands.add_parser("endpoint", help="container endpoints on every host")
    endpoint_commands = endpoint.add_subparsers(dest="endpoint_command", required=True,
                                                metavar="ACTION")
    endpoint_show = endpoint_commands.add_parser("show", parents=[common])
    _output_flag(endpoint_show)
    endpoint_show.set_defaults(handler=cmd_endpoint_show)
    endpoint_remove = endpoint_commands.add_parser(
        "remove", parents=[common],
        help="clean up an endpoint Docker no longer knows: veth, routes, record, addresses")
    endpoint_remove.add_argument("endpoint_id", help="the endpoint ID or a unique prefix")
    endpoint_remove.set_defaults(handler=cmd_endpoint_remove)

    add_profile_commands(commands, common)
    add_node_commands(commands, common)
    add_bgp_commands(commands, common)

    install = commands.add_parser(
        "install", help="install the systemd service of the plugin (starts before Docker)")
    install.add_argument("--systemd", action="store_true", required=True,
                         help="write calico-cnm.service (the only kind of install so far)")
    install.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR,
                         help=f"where the unit goes (default {DEFAULT_UNIT_DIR})")

    uninstall = commands.add_parser(
        "uninstall", parents=[common],
        help="remove this host's policy chains, sets and hooks (stop `serve` first)")
    uninstall.add_argument("--force", action="store_true",
                           help="even while containers on this host use calico networks")
    uninstall.set_defaults(handler=cmd_uninstall)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in settings_module.ENVIRONMENT}
    return settings_module.load(flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(profile_argv(argv))
    try:
        settings = _settings_from(args)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if args.command == "install":
            path = install_service(args.unit_dir)
            print(f"wrote {path}; settings go in {ENV_FILE}; then: systemctl "
                  "daemon-reload && systemctl enable --now calico-cnm")
            return 0
        if args.command == "serve":
            from plugin.server import serve

            serve(settings)
            return 0
        store = open_datastore(settings)
        if args.command == "agent":
            from plugin.agent import Agent
            from plugin.metrics import start_server

            if settings.metrics_address:
                start_server(settings)
            Agent(settings, store).run()
            return 0
        handler: Callable[[Settings, Datastore, argparse.Namespace], int] = args.handler
        try:
            return handler(settings, store, args)
        finally:
            store.close()
    except CalicoCnmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DatastoreError as exc:
        print(f"error: datastore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
