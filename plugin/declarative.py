"""Declarative documents for pools and profiles: `calico-cnm apply -f` and `calico-cnm get`.

A file holds YAML (one document, a list, or a ``---`` multi-document stream; every
list is flattened) or JSON (an object or a list). Each item is one document::

    - kind: pool
      cidr: 10.210.0.0/16
      block_size: 26          # optional; must match the pool's when it exists
      ipip: false             # flags left out are false: a document states the
      nat_outgoing: true      # whole desired state of its pool
      disabled: false
    - kind: profile
      name: web
      tags: [web]
      rules:
        inbound:
        - {action: allow, src_tag: web}   # the rule dicts of profiles.model
        - allow tcp to ports 80,443        # or one rule in the CLI grammar
        outbound:
        - action: allow

``get`` prints exactly this shape (rule dicts, every pool flag, pools in address
order, profiles by name), so ``get -> apply -> get`` changes nothing.

``apply`` first checks every document (its fields, duplicates and overlaps inside the
file, and against the datastore: a pool's block size cannot change, a new pool may not
overlap another pool); the first bad one is refused with :class:`InvalidRequest` (or
:class:`Conflict` against the datastore) naming the document (1-based, counted after
flattening) and its field, and nothing is applied. Then documents are applied in file
order, each on its own (a pool with one compare-and-swap of the pool document, a
profile with one of its record): a pool is created, or its flags are updated; a
profile is created or replaced. apply never deletes anything. Two operators applying at
the same moment may interleave document by document; each document is atomic.

YAML is read with yaml.SafeLoader minus YAML 1.1's base-60 integers: ``20:21`` is
the port range "20:21", never the number 1221. Keys that start with ``!`` (negated
matches such as ``'!src_net'``) must be quoted in YAML, as ``get`` prints them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from netaddr import IPNetwork

from datastore.errors import Conflict, InvalidRequest
from ipam_driver.pools import BLOCK_SIZE_BOUNDS, ENCAP_MODES, Pool, make_pool, parse_cidr
from ipam_driver.service import IpamService
from plugin.bgp_documents import (
    BGP_KINDS,
    BgpDocument,
    apply_bgp_document,
    bgp_label,
    get_bgp_documents,
    parse_bgp_document,
)
from profiles.grammar import parse_rule
from profiles.model import Profile, Rule
from profiles.store import DIRECTIONS, ProfileStore
from routing.bgp_store import BgpStore

KINDS = ("pool", "profile", *BGP_KINDS)
POOL_KEYS = ("kind", "cidr", "block_size", "ipip", "ipip_mode", "vxlan_mode", "nat_outgoing",
             "disabled")
POOL_FLAGS = ("ipip", "nat_outgoing", "disabled")
# Words of `calico-cnm profile` that a new profile cannot be called.
RESERVED_PROFILE_NAMES = ("add", "remove", "show")
RULES_KEYS = ("inbound_rules", "outbound_rules")
OUTPUT_FORMATS = ("yaml", "json")


# ------------------------------------------------------------------------ YAML


class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 integers (``20:21`` stays a string)."""


_INT_TAG = "tag:yaml.org,2002:int"
_INT_RE = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, _INT_RE if tag == _INT_TAG else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_error(exc: yaml.YAMLError, source: str) -> InvalidRequest:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    hint = ""
    if "constructor for the tag '!" in problem:
        hint = " (quote keys that start with '!', e.g. '!src_net')"
    return InvalidRequest(f"{source}: invalid YAML: {problem}{where}{hint}")


def read_documents(text: str, source: str) -> list[Any]:
    """The items of a YAML or JSON text, flattened into one list (empty documents
    are skipped). InvalidRequest for a syntax error, naming line and column."""
    json_error: json.JSONDecodeError | None = None
    if text.lstrip().startswith(("{", "[")):
        try:
            return _flatten([json.loads(text)])
        except json.JSONDecodeError as exc:
            json_error = exc  # it may still be YAML in flow style
    try:
        # A SafeLoader subclass (see _YamlLoader): as safe as yaml.safe_load_all.
        parsed = list(yaml.load_all(text, Loader=_YamlLoader))
    except yaml.YAMLError as exc:
        if json_error is not None:
            raise InvalidRequest(
                f"{source}: invalid JSON: {json_error.msg} at line {json_error.lineno} "
                f"column {json_error.colno}"
            ) from None
        raise _yaml_error(exc, source) from None
    return _flatten(parsed)


def _flatten(parsed: Sequence[Any]) -> list[Any]:
    items: list[Any] = []
    for document in parsed:
        if document is None:
            continue
        if isinstance(document, list):
            items.extend(document)
        else:
            items.append(document)
    return items


def dump_documents(documents: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                   output: str) -> str:
    """documents as YAML or JSON text (ending in a newline)."""
    if output == "json":
        return json.dumps(documents, indent=2) + "\n"
    if output == "yaml":
        return yaml.safe_dump(documents, sort_keys=False, default_flow_style=False)
    raise InvalidRequest(f"output format '{output}' is not one of {', '.join(OUTPUT_FORMATS)}")


# ------------------------------------------------------------------ documents


@dataclass(frozen=True)
class PoolDocument:
    """A pool as an apply document states it; block_size None keeps the pool's."""

    cidr: str
    block_size: int | None
    ipip: bool
    nat_outgoing: bool
    disabled: bool
    ipip_mode: str | None = None
    vxlan_mode: str | None = None

    def make_pool(self) -> Pool:
        return make_pool(self.cidr, self.ipip, self.nat_outgoing, self.disabled,
                         self.block_size, self.modes()[0], self.modes()[1])

    def modes(self) -> tuple[str, str]:
        """(ipip_mode, vxlan_mode): a mode left out is never; ``ipip: true`` is always."""
        return (self.ipip_mode or ("always" if self.ipip else "never"),
                self.vxlan_mode or "never")


Document = PoolDocument | Profile | BgpDocument


def pool_document(pool: Pool) -> dict[str, Any]:
    return {
        "kind": "pool",
        "cidr": pool.cidr,
        "block_size": pool.block_size,
        "ipip_mode": pool.ipip_mode,
        "vxlan_mode": pool.vxlan_mode,
        "nat_outgoing": pool.nat_outgoing,
        "disabled": pool.disabled,
    }


def profile_document(profile: Profile) -> dict[str, Any]:
    return {"kind": "profile", **profile.to_dict()}


def label(document: Document) -> str:
    if isinstance(document, PoolDocument):
        return f"pool {document.cidr}"
    if isinstance(document, Profile):
        return f"profile {document.name}"
    return bgp_label(document)


def rule_from_document(item: Any, where: str) -> Rule:
    """A rule given as a dict (profiles.model's form) or a string in the CLI grammar."""
    if isinstance(item, str):
        try:
            return parse_rule(item)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc}") from None
    if not isinstance(item, Mapping):
        raise InvalidRequest(f"{where}: a rule must be an object or a rule string")
    try:
        return Rule.from_dict(item)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}.{exc}") from None


def rules_document(profile: Profile) -> dict[str, list[dict[str, Any]]]:
    """What `profile NAME rule json` prints and `rule update` reads."""
    return {
        "inbound_rules": [rule.to_dict() for rule in profile.inbound_rules],
        "outbound_rules": [rule.to_dict() for rule in profile.outbound_rules],
    }


def parse_rules_document(data: Any) -> tuple[list[Rule], list[Rule]]:
    """The (inbound, outbound) rules of a rules_document(); both keys are required."""
    if not isinstance(data, Mapping):
        raise InvalidRequest(
            "expected an object with 'inbound_rules' and 'outbound_rules' lists"
        )
    for key in data:
        if key not in RULES_KEYS:
            raise InvalidRequest(f"unknown key '{key}' (expected inbound_rules, outbound_rules)")
    parsed: dict[str, list[Rule]] = {}
    for key in RULES_KEYS:
        if key not in data:
            raise InvalidRequest(f"{key}: missing (give [] for no rules)")
        items = data[key]
        if not isinstance(items, list):
            raise InvalidRequest(f"{key}: must be a list of rules")
        parsed[key] = [rule_from_document(item, f"{key}[{i}]") for i, item in enumerate(items)]
    return parsed["inbound_rules"], parsed["outbound_rules"]


def _where(number: int, item: Mapping[str, Any]) -> str:
    kind = item.get("kind")
    ident = {"pool": item.get("cidr"), "bgppeer": item.get("address")}.get(
        str(kind), item.get("name"))
    if kind in KINDS and isinstance(ident, str):
        return f"document {number} ({kind} {ident})"
    return f"document {number}"


def _parse_pool(item: Mapping[str, Any]) -> PoolDocument:
    for key in item:
        if key not in POOL_KEYS:
            raise InvalidRequest(f"unknown pool key '{key}' (known: {', '.join(POOL_KEYS)})")
    if "cidr" not in item:
        raise InvalidRequest("cidr: a pool needs a cidr")
    flags: dict[str, bool] = {}
    for flag in POOL_FLAGS:
        value = item.get(flag, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise InvalidRequest(f"{flag}: {value!r} is not true or false")
        flags[flag] = value
    modes: dict[str, str | None] = {}
    for key in ("ipip_mode", "vxlan_mode"):
        value = item.get(key)
        if value is not None and value not in ENCAP_MODES:
            raise InvalidRequest(f"{key}: {value!r} is not one of {', '.join(ENCAP_MODES)}")
        modes[key] = value
    if flags["ipip"] and modes["ipip_mode"] not in (None, "always"):
        raise InvalidRequest(f"ipip: true contradicts ipip_mode: {modes['ipip_mode']}")
    block_size = item.get("block_size")
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int)):
        raise InvalidRequest(f"block_size: {block_size!r} is not a prefix length")
    cidr = item["cidr"]
    try:
        network = parse_cidr(cidr, "pool")
    except InvalidRequest as exc:
        raise InvalidRequest(f"cidr: {exc}") from None
    document = PoolDocument(cidr=str(network), block_size=block_size, **flags, **modes)
    try:
        document.make_pool()
    except InvalidRequest as exc:
        # Blame the block size only when the CIDR is fine with the smallest blocks.
        field = "cidr"
        if block_size is not None:
            try:
                make_pool(str(network), block_size=BLOCK_SIZE_BOUNDS[network.version][1])
                field = "block_size"
            except InvalidRequest:
                pass
        raise InvalidRequest(f"{field}: {exc}") from None
    return document


def _parse_profile(item: Mapping[str, Any]) -> Profile:
    data = {key: value for key, value in item.items() if key != "kind"}
    rules = data.get("rules")
    if isinstance(rules, Mapping):
        converted = dict(rules)
        for direction in DIRECTIONS:
            items = rules.get(direction)
            if isinstance(items, list):
                converted[direction] = [
                    rule_from_document(rule, f"rules.{direction}[{i}]").to_dict()
                    if isinstance(rule, str) else rule
                    for i, rule in enumerate(items)
                ]
        data["rules"] = converted
    return Profile.from_dict(data)


def parse_document(item: Any, number: int) -> Document:
    """One document (number is 1-based, for messages)."""
    if not isinstance(item, Mapping):
        raise InvalidRequest(
            f"document {number}: expected an object with a 'kind' ({', '.join(KINDS)}), "
            f"not {item!r}"
        )
    where = _where(number, item)
    kind = item.get("kind")
    if kind not in KINDS:
        problem = "missing" if kind is None else f"'{kind}' is not one of {', '.join(KINDS)}"
        raise InvalidRequest(f"{where}: kind: {problem}")
    try:
        if kind == "pool":
            return _parse_pool(item)
        if kind == "profile":
            return _parse_profile(item)
        return parse_bgp_document(item)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


def parse_documents(items: Sequence[Any]) -> list[Document]:
    """Every document, checked on its own and against the others in the file."""
    documents = [parse_document(item, number) for number, item in enumerate(items, 1)]
    pools: list[tuple[int, IPNetwork]] = []
    names: dict[str, int] = {}
    others: dict[str, int] = {}
    for number, document in enumerate(documents, 1):
        where = f"document {number} ({label(document)})"
        if not isinstance(document, PoolDocument | Profile):
            if label(document) in others:
                raise InvalidRequest(
                    f"{where}: is also given in document {others[label(document)]}")
            others[label(document)] = number
        elif isinstance(document, PoolDocument):
            network = IPNetwork(document.cidr)
            for other_number, other in pools:
                if other.version == network.version and (
                    other.first <= network.last and network.first <= other.last
                ):
                    what = "is the same pool as" if other == network else "overlaps"
                    raise InvalidRequest(
                        f"{where}: cidr: {what} pool {other} of document {other_number}"
                    )
            pools.append((number, network))
        else:
            if document.name in names:
                raise InvalidRequest(
                    f"{where}: name: profile {document.name} is also given in "
                    f"document {names[document.name]}"
                )
            names[document.name] = number
    return documents


def check_against(
    documents: Sequence[Document], pools: Sequence[Pool], profile_names: set[str]
) -> None:
    """Refuse documents that the datastore's current state cannot take."""
    for number, document in enumerate(documents, 1):
        where = f"document {number} ({label(document)})"
        if not isinstance(document, PoolDocument | Profile):
            continue
        if isinstance(document, Profile):
            if document.name in RESERVED_PROFILE_NAMES and document.name not in profile_names:
                raise InvalidRequest(f"{where}: name: {reserved_message(document.name)}")
            continue
        network = IPNetwork(document.cidr)
        for pool in pools:
            if pool.network == network:
                if pool.deleting:
                    raise Conflict(f"{where}: pool {pool.cidr} is being removed")
                if document.block_size is not None and document.block_size != pool.block_size:
                    raise Conflict(
                        f"{where}: block_size: the pool has blocks of /{pool.block_size}, "
                        f"which cannot change to /{document.block_size} (remove the pool "
                        "and add it again)"
                    )
            elif pool.version == network.version and (
                pool.network.first <= network.last and network.first <= pool.network.last
            ):
                raise Conflict(f"{where}: cidr: overlaps existing pool {pool.cidr}")


def reserved_message(name: str) -> str:
    return (
        f"'{name}' cannot be a profile name: it is a word of the `calico-cnm profile` "
        f"command ({', '.join(RESERVED_PROFILE_NAMES)})"
    )


def apply_documents(
    documents: Sequence[Document], ipam: IpamService, profiles: ProfileStore, bgp: BgpStore
) -> list[str]:
    """Check documents against the datastore, then apply them in order.

    Returns one line per document: "<kind> <id>: created|updated|unchanged".
    """
    pools = ipam.get_pools()
    check_against(documents, pools, {profile.name for profile in profiles.list()})
    by_cidr = {pool.cidr: pool for pool in pools}
    results = []
    for document in documents:
        if isinstance(document, PoolDocument):
            existing = by_cidr.get(document.cidr)
            if existing is None:
                ipip_mode, vxlan_mode = document.modes()
                ipam.add_pool(document.cidr, nat_outgoing=document.nat_outgoing,
                              disabled=document.disabled, block_size=document.block_size,
                              ipip_mode=ipip_mode, vxlan_mode=vxlan_mode)
                status = "created"
            else:
                ipip_mode, vxlan_mode = document.modes()
                updated = ipam.update_pool(document.cidr, nat_outgoing=document.nat_outgoing,
                                           disabled=document.disabled,
                                           ipip_mode=ipip_mode, vxlan_mode=vxlan_mode)
                status = "unchanged" if updated == existing else "updated"
        elif isinstance(document, Profile):
            status = profiles.put(document)
        else:
            status = apply_bgp_document(document, bgp)
        results.append(f"{label(document)}: {status}")
    return results


def get_documents(kind: str, ipam: IpamService, profiles: ProfileStore, bgp: BgpStore
                  ) -> list[dict[str, Any]]:
    """Every object of a kind as apply documents."""
    if kind in ("pool", "pools"):
        return [pool_document(pool) for pool in ipam.get_pools()]
    if kind in ("profile", "profiles"):
        return [profile_document(profile) for profile in profiles.list()]
    documents = get_bgp_documents(kind, bgp)
    if documents is not None:
        return documents
    raise InvalidRequest(
        f"cannot get '{kind}': expected pools, profiles, bgpconfig, bgppeers or nodes")
