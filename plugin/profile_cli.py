"""`calico-cnm profile ...`, `calico-cnm apply -f FILE` and `calico-cnm get pools|profiles`.

The profile commands follow calicoctl's familiar grammar::

    calico-cnm profile add NAME
    calico-cnm profile remove NAME
    calico-cnm profile show [NAME] [-o table|json|yaml]
    calico-cnm profile NAME tag add TAG | tag remove TAG | tag show
    calico-cnm profile NAME rule add (inbound|outbound) [--at N] RULE...
    calico-cnm profile NAME rule remove (inbound|outbound) N
    calico-cnm profile NAME rule show | rule json | rule update   (JSON on stdin)

where RULE is ``(allow|deny) [PROTOCOL [type T [code C]]] [from ...] [to ...]``
(see profiles.grammar). Because NAME comes before its subcommand, ``profile_argv``
rewrites ``profile NAME ...`` into ``profile NAME NAME ...`` (a subcommand literally
called ``NAME``) before argparse sees it; ``add``, ``remove`` and ``show`` therefore
cannot be the names of new profiles. A profile that already has such a name (a Docker
network called ``show`` creates one) is still reachable: ``profile show rule show``
is read as NAME=show when ``tag``/``rule`` and an action follow.

Every command takes the settings flags; errors print ``error: ...`` and exit 1, with
nothing changed. Rule errors quote the rule and mark the bad word. Malformed command
lines (a missing word, an unknown subcommand) are argparse's usage errors (exit 2).
A tag that starts with ``-`` goes after ``--``, with the settings flags before it:
``profile web tag add --sqlite-path F -- -x``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence

from datastore.base import Datastore
from datastore.errors import Conflict, InvalidRequest
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from plugin.compose import build_ipam
from plugin.declarative import (
    OUTPUT_FORMATS,
    RESERVED_PROFILE_NAMES,
    apply_documents,
    dump_documents,
    get_documents,
    parse_documents,
    parse_rules_document,
    profile_document,
    read_documents,
    reserved_message,
    rules_document,
)
from plugin.output import table
from plugin.settings import Settings
from profiles.grammar import format_rule, parse_rule
from profiles.model import Profile, Rule
from profiles.store import DIRECTIONS, ProfileStore, check_direction
from routing.bgp_store import BgpStore

Handler = Callable[[Settings, Datastore, argparse.Namespace], int]

# `profile NAME ...` is parsed as `profile NAME NAME ...`: see profile_argv.
NAME_CHOICE = "NAME"
NAME_OBJECTS = ("tag", "rule")
RULE_SYNTAX = (
    "(allow|deny) [PROTOCOL [type T [code C]]] [from [not] tag T|cidr C|ports P ...] "
    "[to [not] tag T|cidr C|ports P ...]"
)


def profile_argv(argv: Sequence[str] | None = None) -> list[str]:
    """argv (default sys.argv[1:]) with ``profile NAME ...`` turned into
    ``profile NAME NAME ...``, which the parser of add_profile_commands reads."""
    words = list(sys.argv[1:] if argv is None else argv)
    if len(words) < 2 or words[0] != "profile" or words[1].startswith("-"):
        return words
    if words[1] in RESERVED_PROFILE_NAMES:
        # `profile show` / `profile show web -o json`, unless it reads
        # `profile <NAME=show> rule show`.
        named = len(words) > 3 and words[2] in NAME_OBJECTS and not words[3].startswith("-")
        if not named:
            return words
    return [words[0], NAME_CHOICE, *words[1:]]


# ---------------------------------------------------------------- helpers


def _profiles(store: Datastore) -> ProfileStore:
    return ProfileStore(store)


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")




def _point_at(words: Sequence[str], message: str) -> str:
    """message plus the rule with the word it names ("at word N") underlined."""
    match = re.search(r"at word (\d+)", message)
    if match is None or not words:
        return message
    position = int(match.group(1))
    if not 1 <= position <= len(words):
        return message
    offset = sum(len(word) + 1 for word in words[: position - 1])
    marker = " " * offset + "^" * max(1, len(words[position - 1]))
    return f"{message}\n  {' '.join(words)}\n  {marker}"


def parse_rule_words(words: Sequence[str]) -> Rule:
    """A rule from the command line; the error marks the bad word."""
    try:
        return parse_rule(list(words))
    except InvalidRequest as exc:
        raise InvalidRequest(_point_at(words, str(exc))) from None


def _rule_number(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequest(f"{what} '{text}' is not a rule number (1, 2, ...)")
    return int(text)


def endpoints_using(
    store: Datastore, name: str
) -> list[tuple[EndpointRecord, NetworkRecord | None, str]]:
    """Endpoints whose own profiles, or whose network's profiles, include name:
    (endpoint, its network record if any, "endpoint" or "network")."""
    networks = {
        record.id: record
        for record in (NetworkRecord.from_dict(entry.data) for entry in store.list(NETWORKS))
    }
    users = []
    for entry in store.list(ENDPOINTS):
        endpoint = EndpointRecord.from_dict(entry.data)
        network = networks.get(endpoint.network_id)
        if name in endpoint.profiles:
            users.append((endpoint, network, "endpoint"))
        elif network is not None and name in network.profiles:
            users.append((endpoint, network, "network"))
    return users


def _network_label(network_id: str, network: NetworkRecord | None) -> str:
    name = network.name if network is not None else ""
    return f"{name} ({network_id[:12]})" if name else network_id[:12]


def _read_input(path: str) -> tuple[str, str]:
    """(text, name for messages) of a file, or of stdin for "-"."""
    if path == "-":
        return sys.stdin.read(), "stdin"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), path
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidRequest(f"cannot read {path}: {reason}") from None


def _show_profiles(profiles: Sequence[Profile], output: str, single: bool) -> None:
    if output in OUTPUT_FORMATS:
        documents = [profile_document(profile) for profile in profiles]
        _write(dump_documents(documents[0] if single else documents, output))
        return
    rows = [[
        p.name, ",".join(p.tags) or "-", len(p.inbound_rules), len(p.outbound_rules),
    ] for p in profiles]
    _write(table(["NAME", "TAGS", "INBOUND RULES", "OUTBOUND RULES"], rows))


# --------------------------------------------------------------- commands
# Each takes (settings, store, args) and returns an exit code.


def cmd_profile_add(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    name = args.name
    if name in RESERVED_PROFILE_NAMES:
        raise InvalidRequest(reserved_message(name))
    profile = _profiles(store).create(Profile.network_default(name))
    print(f"created profile {profile.name} (tag {name}; inbound: allow from tag {name}; "
          "outbound: allow)")
    return 0


def cmd_profile_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    profiles = _profiles(store)
    name = profiles.get(args.name).name
    users = endpoints_using(store, name)
    if users:
        endpoint, network, how = users[0]
        via = " through its network" if how == "network" else ""
        more = f" and {len(users) - 1} more" if len(users) > 1 else ""
        raise Conflict(
            f"profile '{name}' is in use by endpoint {endpoint.id[:12]}{via} (network "
            f"{_network_label(endpoint.network_id, network)}, host {endpoint.hostname})"
            f"{more}; remove those containers first"
        )
    profiles.remove(name)
    print(f"removed profile {name}")
    networks = [
        _network_label(record.id, record)
        for record in (NetworkRecord.from_dict(e.data) for e in store.list(NETWORKS))
        if name in record.profiles
    ]
    if networks:
        print(f"warning: network(s) {', '.join(networks)} still list profile {name}; their "
              "new containers will drop all traffic until it exists again", file=sys.stderr)
    return 0


def cmd_profile_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    profiles = _profiles(store)
    if args.name is not None:
        _show_profiles([profiles.get(args.name)], args.output, single=True)
    else:
        _show_profiles(profiles.list(), args.output, single=False)
    return 0


def cmd_tag_add(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    _profiles(store).add_tag(args.name, args.tag)
    print(f"added tag {args.tag} to profile {args.name}")
    return 0


def cmd_tag_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    _profiles(store).remove_tag(args.name, args.tag)
    print(f"removed tag {args.tag} from profile {args.name}")
    return 0


def cmd_tag_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    for tag in _profiles(store).get(args.name).tags:
        print(tag)
    return 0


def cmd_rule_add(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    direction = check_direction(args.direction)
    rule = parse_rule_words(args.rule)
    position = None if args.at is None else _rule_number(args.at, "--at")
    profile = _profiles(store).add_rule(args.name, direction, rule, position)
    rules = profile.inbound_rules if direction == "inbound" else profile.outbound_rules
    number = len(rules) if position is None else position
    print(f"added {direction} rule {number} to profile {profile.name}: {format_rule(rule)}")
    return 0


def cmd_rule_remove(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    direction = check_direction(args.direction)
    number = _rule_number(args.number, "rule number")
    removed = _profiles(store).remove_rule(args.name, direction, number)
    print(f"removed {direction} rule {number} from profile {args.name}: {format_rule(removed)}")
    return 0


def cmd_rule_show(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    profile = _profiles(store).get(args.name)
    lines = []
    for direction in DIRECTIONS:
        rules = profile.inbound_rules if direction == "inbound" else profile.outbound_rules
        lines.append(f"{direction} rules:")
        width = len(str(len(rules)))
        lines += [f"  {n:>{width}}  {format_rule(rule)}" for n, rule in enumerate(rules, 1)]
        if not rules:
            lines.append("  (none: nothing matches)")
    _write("\n".join(lines))
    return 0


def cmd_rule_json(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    profile = _profiles(store).get(args.name)
    _write(json.dumps(rules_document(profile), indent=2))
    return 0


def cmd_rule_update(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    text = sys.stdin.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"stdin: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    try:
        inbound, outbound = parse_rules_document(data)
    except InvalidRequest as exc:
        raise InvalidRequest(f"stdin: {exc}") from None
    profile = _profiles(store).replace_rules(args.name, inbound, outbound)
    print(f"updated the rules of profile {profile.name}: {len(profile.inbound_rules)} "
          f"inbound, {len(profile.outbound_rules)} outbound")
    return 0


def cmd_apply(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    text, source = _read_input(args.file)
    try:
        documents = parse_documents(read_documents(text, source))
    except InvalidRequest as exc:
        message = str(exc)
        if not message.startswith(f"{source}:"):
            message = f"{source}: {message}"
        raise InvalidRequest(message) from None
    if not documents:
        print(f"{source}: no documents, nothing to apply")
        return 0
    for line in apply_documents(documents, build_ipam(settings, store), _profiles(store),
                                BgpStore(store)):
        print(line)
    return 0


def cmd_get(settings: Settings, store: Datastore, args: argparse.Namespace) -> int:
    documents = get_documents(args.kind, build_ipam(settings, store), _profiles(store),
                              BgpStore(store))
    _write(dump_documents(documents, args.output))
    return 0


# ----------------------------------------------------------------- parser


def add_profile_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register `profile`, `apply` and `get` on the CLI's subcommands.

    Every leaf command takes the settings flags of ``common``; argv must go through
    :func:`profile_argv` before ``parse_args``.
    """
    profile = commands.add_parser(
        "profile", help="security profiles: tags and ordered inbound/outbound rules",
        description="Security profiles. `profile add|remove|show ...` manage profiles; "
        "`profile NAME tag|rule ...` change one profile's tags and rules.",
    )
    actions = profile.add_subparsers(dest="profile_command", required=True,
                                     metavar="{add,remove,show,NAME}")

    add = actions.add_parser(
        "add", parents=[common],
        help="create a profile tagged with its name, allowing inbound traffic from that "
        "tag and all outbound traffic",
    )
    add.add_argument("name", metavar="NAME")
    add.set_defaults(handler=cmd_profile_add)

    remove = actions.add_parser("remove", parents=[common],
                                help="delete a profile that no endpoint uses")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=cmd_profile_remove)

    show = actions.add_parser("show", parents=[common], help="list profiles (or one)")
    show.add_argument("name", metavar="NAME", nargs="?")
    show.add_argument("-o", "--output", choices=("table", *OUTPUT_FORMATS), default="table",
                      help="table, or the documents of `calico-cnm apply` as json or yaml")
    show.set_defaults(handler=cmd_profile_show)

    named = actions.add_parser(
        NAME_CHOICE, prog=profile.prog, help="NAME tag|rule ...: one profile's tags and rules",
        description="Change the tags and rules of profile NAME.",
    )
    named.add_argument("name", metavar="NAME", help="the profile")
    objects = named.add_subparsers(dest="profile_object", required=True, metavar="{tag,rule}")

    tag = objects.add_parser("tag", help="the profile's tags (endpoints carrying the "
                             "profile are members of them)")
    tag_actions = tag.add_subparsers(dest="tag_command", required=True,
                                     metavar="{add,remove,show}")
    tag_add = tag_actions.add_parser("add", parents=[common], help="add a tag")
    tag_add.add_argument("tag", metavar="TAG")
    tag_add.set_defaults(handler=cmd_tag_add)
    tag_remove = tag_actions.add_parser("remove", parents=[common], help="remove a tag")
    tag_remove.add_argument("tag", metavar="TAG")
    tag_remove.set_defaults(handler=cmd_tag_remove)
    tag_show = tag_actions.add_parser("show", parents=[common], help="list the tags")
    tag_show.set_defaults(handler=cmd_tag_show)

    rule = objects.add_parser("rule", help="the profile's ordered inbound and outbound rules")
    rule_actions = rule.add_subparsers(dest="rule_command", required=True,
                                       metavar="{add,remove,show,json,update}")
    rule_add = rule_actions.add_parser(
        "add", parents=[common], help="add a rule (at the end, or as rule N with --at N)",
        description=f"RULE: {RULE_SYNTAX}. PROTOCOL: tcp, udp, icmp, icmpv6 or a number; "
        "ports (tcp and udp only): lists and ranges such as 80,443,8000:8080.",
    )
    rule_add.add_argument("direction", metavar="inbound|outbound")
    rule_add.add_argument("--at", metavar="N", default=None,
                          help="insert as rule N (1 = first; default: append)")
    rule_add.add_argument("rule", metavar="RULE", nargs="+", help=RULE_SYNTAX)
    rule_add.set_defaults(handler=cmd_rule_add)
    rule_remove = rule_actions.add_parser("remove", parents=[common],
                                          help="remove rule N (as numbered by `rule show`)")
    rule_remove.add_argument("direction", metavar="inbound|outbound")
    rule_remove.add_argument("number", metavar="N")
    rule_remove.set_defaults(handler=cmd_rule_remove)
    rule_show = rule_actions.add_parser("show", parents=[common],
                                        help="the numbered rules, inbound then outbound")
    rule_show.set_defaults(handler=cmd_rule_show)
    rule_json = rule_actions.add_parser(
        "json", parents=[common],
        help='print {"inbound_rules": [...], "outbound_rules": [...]} (for `rule update`)',
    )
    rule_json.set_defaults(handler=cmd_rule_json)
    rule_update = rule_actions.add_parser(
        "update", parents=[common],
        help="replace every rule with the JSON of `rule json` read from stdin",
    )
    rule_update.set_defaults(handler=cmd_rule_update)

    apply = commands.add_parser(
        "apply", parents=[common],
        help="create or update pools, profiles and BGP settings from YAML or JSON documents",
        description="Documents: {kind: pool, cidr, block_size, ipip_mode, vxlan_mode, "
        "nat_outgoing, disabled}, {kind: profile, name, tags, rules: {inbound, outbound}}, "
        "{kind: bgpconfig, as_number, mesh}, {kind: bgppeer, address, as_number, node} and "
        "{kind: node, name, as_number, route_reflector_cluster_id}, as `calico-cnm get` "
        "prints them. Every document is checked before any is applied.",
    )
    apply.add_argument("-f", "--filename", dest="file", metavar="FILE", required=True,
                       help="a YAML or JSON file; - reads stdin")
    apply.set_defaults(handler=cmd_apply)

    get = commands.add_parser("get", parents=[common],
                              help="print pools, profiles or BGP settings as documents "
                              "for `apply -f`")
    get.add_argument("kind", choices=("pools", "profiles", "pool", "profile", "bgpconfig",
                                      "bgppeers", "bgppeer", "nodes", "node"),
                     metavar="pools|profiles|bgpconfig|bgppeers|nodes")
    get.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="yaml")
    get.set_defaults(handler=cmd_get)
