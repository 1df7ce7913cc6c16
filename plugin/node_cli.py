"""`calico-cnm node show|status|remove`: the node registry as an operator sees it."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from datastore.base import Datastore
from datastore.errors import CalicoCnmError
from driver.records import ENDPOINTS, EndpointRecord
from ipam_driver.block_store import BLOCKS_PREFIX
from ipam_driver.blocks import AllocationBlock
from ipam_driver.service import POOLS_KEY
from plugin.bgp_cli import add_node_set_command
from plugin.node_removal import remove_node
from plugin.output import table
from plugin.settings import Settings
from routing.bgp_store import BgpStore
from routing.bgp_sync import effective_as
from routing.bird_control import BirdControl
from routing.nodes import NodeRegistry, NodeStatus, now
from routing.sync import pool_infos


def node_overview(store: Datastore, timeout: float) -> list[dict[str, Any]]:
    """Every node with its addresses, tunnel addresses, blocks, endpoint count and
    whether its heartbeat is recent."""
    registry = NodeRegistry(store)
    statuses = registry.statuses()
    bgp = BgpStore(store)
    config, node_settings = bgp.settings(), bgp.nodes()
    blocks: dict[str, list[str]] = {}
    for entry in store.list(BLOCKS_PREFIX):
        block = AllocationBlock.from_dict(entry.data)
        blocks.setdefault(block.host or "", []).append(str(block.cidr))
    endpoints: dict[str, int] = {}
    for entry in store.list(ENDPOINTS):
        host = EndpointRecord.from_dict(entry.data).hostname
        endpoints[host] = endpoints.get(host, 0) + 1
    moment = now()
    rows = []
    for node in registry.list():
        status = statuses.get(node.name)
        rows.append({
            **node.to_dict(),
            "effective_as": effective_as(node, node_settings.get(node.name), config),
            "route_reflector_cluster_id": (node_settings[node.name].rr_cluster_id
                                           if node.name in node_settings else None),
            "alive": bool(status and status.alive(moment, timeout)),
            "heartbeat_age": round(moment - status.heartbeat, 1) if status else None,
            "blocks": sorted(blocks.get(node.name, [])),
            "endpoints": endpoints.get(node.name, 0),
        })
    return rows


def cmd_node_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    rows = node_overview(store, settings.node_timeout)
    if args.output == "json":
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    print(table(
        ["NAME", "IPV4", "IPV6", "AS", "TUNNELS", "BLOCKS", "ENDPOINTS", "STATE"],
        [[r["name"], r["ipv4"] or "-", r["ipv6"] or "-", r["effective_as"],
          ",".join(f"{k}={r[k + '_ipv4']}" for k in ("vxlan", "ipip") if r[k + "_ipv4"])
          or "-", " ".join(r["blocks"]) or "-", r["endpoints"],
          "alive" if r["alive"] else "down"] for r in rows]))
    return 0


def bgp_view(settings: Settings, name: str, status: NodeStatus | None) -> dict[str, Any]:
    """BIRD's state and sessions: live from the control socket for this host, else
    from the node's last heartbeat."""
    reported = (status.bgp if status else None) or {}
    view: dict[str, Any] = {
        "bird_running": bool(reported.get("running")), "pid": reported.get("pid"),
        "config_error": reported.get("config_error"),
        "restarts": reported.get("restarts", 0),
        "sessions": reported.get("sessions", []), "source": "heartbeat",
        "established": reported.get("established", 0),
        "memory": reported.get("memory"),
    }
    if name != settings.hostname:
        return view
    control = BirdControl(os.path.join(settings.run_dir, "bird.ctl"))
    try:
        sessions = control.sessions()
    except CalicoCnmError as exc:
        view.update(bird_running=False, sessions=[], source="socket", socket_error=str(exc))
        return view
    try:
        view["memory"] = control.memory()
    except CalicoCnmError:
        pass
    view.update(bird_running=True, sessions=[s.to_dict() for s in sessions],
                source="socket",
                established=len([s for s in sessions if s.info.startswith("Established")]))
    return view


def _bgp_tables(sessions: list[dict[str, Any]]) -> list[str]:
    out = []
    for family in (4, 6):
        rows = [[s["neighbor"] or s["name"], s["peer_type"] or "-", s["state"], s["since"],
                 s["info"] + (f" ({s['error']})" if s.get("error") else "")]
                for s in sessions if s["family"] == family]
        out.append(f"IPv{family} BGP status")
        out.append(table(["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"], rows)
                   if rows else f"No IPv{family} peers found.")
        out.append("")
    return out


def cmd_node_status(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    name = args.name or settings.hostname
    registry = NodeRegistry(store)
    record = registry.get(name)
    status = registry.statuses().get(name)
    pools = store.get(POOLS_KEY)
    modes = [{"pool": p.cidr, "vxlan_mode": p.vxlan_mode, "ipip_mode": p.ipip_mode}
             for p in pool_infos(pools.data if pools else None)]
    bgp = BgpStore(store)
    config = bgp.settings()
    routing = status.routing if status else "unknown"
    report: dict[str, Any] = {
        "node": record.to_dict(),
        "as_number": effective_as(record, bgp.node(name), config),
        "alive": bool(status and status.alive(now(), settings.node_timeout)),
        "routing": routing,
        "pools": modes,
        "status": status.to_dict() if status else None,
        "bgp": bgp_view(settings, name, status) if routing == "bgp" else None,
    }
    if args.output == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    alive = report["alive"]
    print(f"calico-cnm agent on {record.name} is "
          + (f"running (routing {routing})" if alive else "not running (no recent heartbeat)"))
    view = report["bgp"]
    if view is not None:
        if view["bird_running"]:
            details = [f"pid {view['pid']}"] if view["pid"] else []
            details += [f"memory {view['memory']}"] if view.get("memory") else []
            print("BIRD is running" + (f" ({', '.join(details)})" if details else "")
                  + (f", restarted {view['restarts']} time(s)" if view["restarts"] else ""))
        else:
            print("BIRD is not running" + (f": {view['socket_error']}"
                                           if view.get("socket_error") else ""))
        if view["config_error"]:
            print(f"BIRD configuration error: {view['config_error']}")
        if view["source"] == "heartbeat":
            print(f"from its heartbeat: {view['established']} session(s) established; "
                  "those that are not:")
        print()
        print("\n".join(_bgp_tables(view["sessions"])))
    print(f"node {record.name}: IPv4 {record.ipv4 or '-'}, IPv6 {record.ipv6 or '-'}, "
          f"uplink {record.interface or '-'} (MTU {record.mtu or '-'}), "
          f"AS {report['as_number']}")
    for mode in modes:
        print(f"pool {mode['pool']}: vxlan {mode['vxlan_mode']}, ipip {mode['ipip_mode']}")
    if status is None:
        print("no status reported yet (is the agent running?)")
        return 0
    for device, state in sorted(status.tunnels.items()):
        print(f"tunnel {device}: {state}")
    print(f"last resync: {_age(status.last_resync)}; {status.routes} route(s) planned")
    if status.peers:
        print(table(["PEER", "MODE", "ROUTES", "UNREACHABLE"], [
            [p["name"], ",".join(p["modes"]) or "-", p["routes"],
             "; ".join(p["unreachable"]) or "-"] for p in status.peers]))
    for error in status.errors:
        print(f"error: {error}")
    return 0


def cmd_node_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    removal = remove_node(store, args.name, settings.node_timeout, args.force)
    print(f"removed node {args.name}: {len(removal.endpoints)} endpoint(s), "
          f"{len(removal.networks)} network(s), {len(removal.addresses)} address(es) "
          f"released, {len(removal.blocks)} block(s) released")
    return 0


def _age(moment: float | None) -> str:
    if moment is None:
        return "never"
    return f"{now() - moment:.1f} s ago"


def add_node_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    node = commands.add_parser("node", help="the hosts of the cluster and their routing")
    actions = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[common],
                              help="every node: addresses, blocks, endpoints, alive or not")
    show.add_argument("-o", "--output", choices=["table", "json"], default="table")
    show.set_defaults(handler=cmd_node_show)
    status = actions.add_parser("status", parents=[common],
                                help="this node's routing: agent, BIRD and BGP sessions, tunnels, "
                                "peers with unreachable blocks, errors")
    status.add_argument("name", nargs="?", help="another node (default: this one)")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    status.set_defaults(handler=cmd_node_status)
    remove = actions.add_parser(
        "remove", parents=[common],
        help="forget a node: its routes everywhere, its blocks, endpoints and addresses")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true",
                        help="even while the node still sends heartbeats")
    remove.set_defaults(handler=cmd_node_remove)
    add_node_set_command(actions, common)


