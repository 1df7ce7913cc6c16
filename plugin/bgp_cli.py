"""`calico-cnm bgp ...` and `calico-cnm node set`: the cluster's BGP settings."""

from __future__ import annotations

import argparse
import json

from datastore.base import Datastore
from datastore.errors import InvalidRequest
from plugin.output import table
from plugin.settings import Settings
from routing.bgp_store import BgpStore


def cmd_bgp_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    bgp = BgpStore(store)
    config, peers, nodes = bgp.settings(), bgp.peers(), bgp.nodes()
    if args.output == "json":
        print(json.dumps({
            "as_number": config.default_as, "mesh": config.mesh,
            "peers": [{"address": p.address, "as_number": p.as_number, "node": p.node}
                      for p in peers],
            "nodes": {n.name: n.to_dict() for n in nodes.values()},
        }, indent=2, sort_keys=True))
        return 0
    print(f"default AS {config.default_as}; node-to-node mesh "
          f"{'on' if config.mesh else 'off'}")
    if peers:
        print(_peer_table(bgp))
    for node in sorted(nodes.values(), key=lambda n: n.name):
        parts = []
        if node.as_number is not None:
            parts.append(f"AS {node.as_number}")
        if node.rr_cluster_id is not None:
            parts.append(f"route reflector (cluster id {node.rr_cluster_id})")
        print(f"node {node.name}: {', '.join(parts)}")
    return 0


def _peer_table(bgp: BgpStore) -> str:
    return table(["PEER ADDRESS", "AS", "SCOPE"],
                 [[p.address, p.as_number, f"node {p.node}" if p.node else "global"]
                  for p in bgp.peers()])


def cmd_bgp_as(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    config = BgpStore(store).configure(as_number_value=args.default_as)
    print(f"default AS is {config.default_as}")
    return 0


def cmd_bgp_mesh(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    config = BgpStore(store).configure(mesh=args.state == "on")
    print(f"node-to-node mesh is {'on' if config.mesh else 'off'}")
    return 0


def cmd_peer_add(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    peer, created = BgpStore(store).add_peer(args.address, args.peer_as, args.node)
    scope = f"of node {peer.node}" if peer.node else "of every node"
    print(f"{'added' if created else 'updated'} BGP peer {peer.address} (AS "
          f"{peer.as_number}) {scope}")
    return 0


def cmd_peer_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    peer = BgpStore(store).remove_peer(args.address, args.node)
    print(f"removed BGP peer {peer.address}" + (f" of node {peer.node}" if peer.node else ""))
    return 0


def cmd_peer_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    bgp = BgpStore(store)
    if args.output == "json":
        print(json.dumps([{"address": p.address, "as_number": p.as_number, "node": p.node}
                          for p in bgp.peers()], indent=2, sort_keys=True))
        return 0
    print(_peer_table(bgp))
    return 0


def cmd_node_set(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    if args.node_as is None and args.rr_cluster_id is None:
        raise InvalidRequest("nothing to set: give --as and/or --route-reflector-cluster-id")
    clear_as = args.node_as == "default"
    clear_rr = args.rr_cluster_id == "none"
    node = BgpStore(store).set_node(
        args.name, None if clear_as else args.node_as,
        None if clear_rr else args.rr_cluster_id, clear_as=clear_as, clear_rr=clear_rr)
    print(f"node {node.name}: AS {node.as_number or 'default'}, "
          + (f"route reflector (cluster id {node.rr_cluster_id})" if node.rr_cluster_id
             else "not a route reflector"))
    return 0


def add_bgp_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    bgp = commands.add_parser("bgp", help="BGP: default AS, node-to-node mesh, peers")
    actions = bgp.add_subparsers(dest="bgp_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[common],
                              help="the BGP configuration, peers and node settings")
    show.add_argument("-o", "--output", choices=["table", "json"], default="table")
    show.set_defaults(handler=cmd_bgp_show)
    as_cmd = actions.add_parser("as", parents=[common],
                                help="set the default AS number of every node")
    # dest names differ from the settings' as_number (the --as-number flag)
    as_cmd.add_argument("default_as", metavar="N")
    as_cmd.set_defaults(handler=cmd_bgp_as)
    mesh = actions.add_parser("mesh", parents=[common],
                              help="turn the node-to-node mesh on or off (off: use route "
                              "reflectors or explicit peers)")
    mesh.add_argument("state", choices=["on", "off"])
    mesh.set_defaults(handler=cmd_bgp_mesh)

    peer = actions.add_parser("peer", help="explicit BGP peers (e.g. top-of-rack routers)")
    peer_actions = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    add = peer_actions.add_parser("add", parents=[common],
                                  help="peer every node (or one) with a router")
    add.add_argument("address")
    add.add_argument("--as", dest="peer_as", required=True, metavar="N")
    add.add_argument("--node", default=None, help="only this node peers (default: every)")
    add.set_defaults(handler=cmd_peer_add)
    remove = peer_actions.add_parser("remove", parents=[common], help="remove a peer")
    remove.add_argument("address")
    remove.add_argument("--node", default=None, help="the node of a node-specific peer")
    remove.set_defaults(handler=cmd_peer_remove)
    peer_show = peer_actions.add_parser("show", parents=[common], help="list the peers")
    peer_show.add_argument("-o", "--output", choices=["table", "json"], default="table")
    peer_show.set_defaults(handler=cmd_peer_show)


def add_node_set_command(actions: argparse._SubParsersAction[argparse.ArgumentParser],
                         common: argparse.ArgumentParser) -> None:
    node_set = actions.add_parser(
        "set", parents=[common],
        help="a node's BGP settings: its AS number, route-reflector cluster id")
    node_set.add_argument("name")
    node_set.add_argument("--as", dest="node_as", default=None, metavar="N|default",
                          help="this node's AS number ('default': the cluster's)")
    node_set.add_argument("--route-reflector-cluster-id", dest="rr_cluster_id",
                          default=None, metavar="ID|none",
                          help="make the node a route reflector with this cluster id "
                          "(e.g. 244.0.0.1; 'none': a plain node again)")
    node_set.set_defaults(handler=cmd_node_set)
