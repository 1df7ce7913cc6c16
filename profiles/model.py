"""Security profiles: the data model and its validation (pure, no I/O).

A :class:`Profile` has a name, a list of tags and two ordered rule lists,
``inbound_rules`` (traffic to the endpoint) and ``outbound_rules`` (traffic from
it). Every endpoint carries one or more profiles, in order. Semantics (applied by
``profiles.compiler``): within a profile rules are tried in order, the first match
decides (``allow`` accepts, ``deny`` drops and is final); a profile where nothing
matches falls through to the endpoint's next profile; when no profile matches the
packet is dropped.

Dict form of a rule (the JSON/YAML shape, close to calicoctl's profile rules).
Only the keys that are set appear; a ``!`` prefix negates a match::

    {"action": "allow",                  # required: "allow" | "deny"
     "protocol": "tcp",                  # "tcp" | "udp" | "icmp" | "icmpv6" | 1-255
     "icmp_type": 8, "icmp_code": 0,     # only with protocol icmp / icmpv6
     "src_tag": "web", "src_net": "10.0.0.0/8", "src_ports": [80, "8000:8080"],
     "dst_tag": ..., "dst_net": ..., "dst_ports": ...,
     "!src_tag": ..., "!src_net": ..., "!src_ports": ...,
     "!dst_tag": ..., "!dst_net": ..., "!dst_ports": ...}

Dict form of a profile::

    {"name": "web", "tags": ["web"],
     "rules": {"inbound": [<rule>, ...], "outbound": [<rule>, ...]}}

Normal forms (what ``from_dict`` and the CLI grammar produce, so that equal rules
compare equal): protocol names are lower case and the numbers 1, 6, 17 and 58 become
``icmp``, ``tcp``, ``udp`` and ``icmpv6``; CIDRs are written as their network
(``10.0.0.7/8`` -> ``10.0.0.0/8``, a bare address gets /32 or /128); ports are ints
and ranges are ``"low:high"`` strings.

Choices beyond the issue, each refused with :class:`InvalidRequest`:

* names and tags match ``[a-zA-Z0-9_.-]{1,128}``;
* protocol 0 is refused: iptables reads ``-p 0`` as "every protocol";
* a port list holds 1..100 entries (an empty list would match nothing; the cap keeps
  the rules a port list expands to small);
* all CIDRs of one rule belong to one IP version, which must agree with icmp (IPv4)
  or icmpv6 (IPv6). A rule with an IPv4 CIDR or icmp applies to IPv4 traffic only
  (it is left out of the IPv6 rules), and the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import netaddr

from datastore.errors import InvalidRequest

ACTIONS = ("allow", "deny")
PROTOCOL_NAMES = ("tcp", "udp", "icmp", "icmpv6")
PROTOCOL_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
_NAME_BY_NUMBER = {number: name for name, number in PROTOCOL_NUMBERS.items()}
PORT_PROTOCOLS = ("tcp", "udp")
ICMP_PROTOCOLS = ("icmp", "icmpv6")

NAME_MAX = 128
NAME_RE = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
MAX_PORT_ENTRIES = 100
MAX_PORT = 65535
# ICMP type 255 is the kernel's "any type" wildcard in the icmp match: refused.
MAX_ICMP_TYPE = 254
MAX_ICMP_CODE = 255

Port = int | str
Protocol = str | int

# (side, negated) -> dataclass field name. Dict keys: field name, "!" + field name
# without the "not_" prefix for negations.
MATCH_FIELDS = (
    "src_tag", "src_net", "src_ports", "dst_tag", "dst_net", "dst_ports",
    "not_src_tag", "not_src_net", "not_src_ports",
    "not_dst_tag", "not_dst_net", "not_dst_ports",
)
TAG_FIELDS = ("src_tag", "dst_tag", "not_src_tag", "not_dst_tag")
NET_FIELDS = ("src_net", "dst_net", "not_src_net", "not_dst_net")
PORT_FIELDS = ("src_ports", "dst_ports", "not_src_ports", "not_dst_ports")


def dict_key(field_name: str) -> str:
    """The dict key of a rule field: ``not_src_net`` -> ``!src_net``."""
    if field_name.startswith("not_"):
        return "!" + field_name[4:]
    return field_name


def field_name(key: str) -> str:
    """The rule field of a dict key: ``!src_net`` -> ``not_src_net``."""
    if key.startswith("!"):
        return "not_" + key[1:]
    return key


# --- value checks shared with the grammar -------------------------------------------
# Each returns the normal form or raises InvalidRequest with a message that quotes the
# offending value; callers add where it was (a field name, a word position).


def check_name(value: Any, what: str = "name") -> str:
    """A profile name or tag: ``[a-zA-Z0-9_.-]``, 1 to 128 characters."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} {value!r} must be a string")
    if not value:
        raise InvalidRequest(f"{what} must not be empty")
    if len(value) > NAME_MAX:
        raise InvalidRequest(
            f"{what} '{value[:20]}...' is longer than {NAME_MAX} characters"
        )
    if not NAME_RE.fullmatch(value):
        raise InvalidRequest(
            f"{what} '{value}' has illegal characters (allowed: a-z A-Z 0-9 _ . -)"
        )
    return value


def normalize_protocol(value: Any) -> Protocol:
    """``"TCP"`` -> ``"tcp"``, ``6``/``"6"`` -> ``"tcp"``, ``47`` -> ``47``."""
    if isinstance(value, bool):
        raise InvalidRequest(f"invalid protocol {value!r}")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in PROTOCOL_NAMES:
            return word
        if not word.isdigit():
            raise InvalidRequest(
                f"unknown protocol '{value}' (use tcp, udp, icmp, icmpv6 or a number 1-255)"
            )
        value = int(word)
    if not isinstance(value, int):
        raise InvalidRequest(f"invalid protocol {value!r}")
    if value == 0:
        raise InvalidRequest(
            "protocol 0 would match every protocol in iptables; leave the protocol out"
        )
    if not 0 < value <= 255:
        raise InvalidRequest(f"protocol number {value} is out of range 1-255")
    return _NAME_BY_NUMBER.get(value, value)


def normalize_cidr(value: Any) -> str:
    """A CIDR (or bare address) in its network form: ``10.1.2.3/8`` -> ``10.0.0.0/8``."""
    if not isinstance(value, str) or value != value.strip() or not value:
        raise InvalidRequest(f"invalid CIDR {value!r}")
    try:
        network = netaddr.IPNetwork(value)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidRequest(f"invalid CIDR '{value}'") from None
    return str(network.cidr)


def cidr_version(value: str) -> int:
    return netaddr.IPNetwork(value).version


def _port_number(text: str, whole: str) -> int:
    if not text.isdigit():
        raise InvalidRequest(f"invalid port '{whole}'")
    number = int(text)
    if number > MAX_PORT:
        raise InvalidRequest(f"port {number} is out of range 0-{MAX_PORT}")
    return number


def normalize_port(value: Any) -> Port:
    """One port entry: an int 0-65535 or a ``"low:high"`` range (``"80"`` -> ``80``)."""
    if isinstance(value, bool):
        raise InvalidRequest(f"invalid port {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_PORT:
            raise InvalidRequest(f"port {value} is out of range 0-{MAX_PORT}")
        return value
    if not isinstance(value, str):
        raise InvalidRequest(f"invalid port {value!r}")
    if ":" in value:
        low_text, _, high_text = value.partition(":")
        low = _port_number(low_text, value)
        high = _port_number(high_text, value)
        if low > high:
            raise InvalidRequest(f"port range '{value}' runs backwards ({low} > {high})")
        return f"{low}:{high}"
    return _port_number(value, value)


def normalize_ports(value: Any) -> list[Port]:
    """A port list: ``[80, "8000:8080"]``; a string ``"80,8000:8080"`` is split."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"ports must be a list, not {value!r}")
    if not value:
        raise InvalidRequest("ports list is empty")
    if len(value) > MAX_PORT_ENTRIES:
        raise InvalidRequest(
            f"ports list has {len(value)} entries, at most {MAX_PORT_ENTRIES} are allowed"
        )
    return [normalize_port(item) for item in value]


def port_weight(port: Port) -> int:
    """How many of multiport's 15 slots an entry takes: a range takes two."""
    return 2 if isinstance(port, str) else 1


def check_icmp_type(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"invalid ICMP type {value!r}")
    if value == 255:
        raise InvalidRequest("ICMP type 255 cannot be matched (iptables reads it as 'any')")
    if not 0 <= value <= MAX_ICMP_TYPE:
        raise InvalidRequest(f"ICMP type {value} is out of range 0-{MAX_ICMP_TYPE}")
    return value


def check_icmp_code(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"invalid ICMP code {value!r}")
    if not 0 <= value <= MAX_ICMP_CODE:
        raise InvalidRequest(f"ICMP code {value} is out of range 0-{MAX_ICMP_CODE}")
    return value


def _field_error(name: str, exc: InvalidRequest) -> InvalidRequest:
    return InvalidRequest(f"{name}: {exc}")


@dataclass
class Rule:
    """One rule. Every match left as ``None`` matches anything."""

    action: str
    protocol: Protocol | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    src_tag: str | None = None
    src_net: str | None = None
    src_ports: list[Port] | None = None
    dst_tag: str | None = None
    dst_net: str | None = None
    dst_ports: list[Port] | None = None
    not_src_tag: str | None = None
    not_src_net: str | None = None
    not_src_ports: list[Port] | None = None
    not_dst_tag: str | None = None
    not_dst_net: str | None = None
    not_dst_ports: list[Port] | None = None

    def validate(self) -> Rule:
        """Check every field; raise :class:`InvalidRequest` naming the field. Returns self."""
        if self.action not in ACTIONS:
            raise InvalidRequest(f"action: '{self.action}' is not one of allow, deny")
        protocol: Protocol | None = None
        if self.protocol is not None:
            try:
                protocol = normalize_protocol(self.protocol)
            except InvalidRequest as exc:
                raise _field_error("protocol", exc) from None
        for name in TAG_FIELDS:
            value = getattr(self, name)
            if value is not None:
                try:
                    check_name(value, "tag")
                except InvalidRequest as exc:
                    raise _field_error(name, exc) from None
        versions: dict[int, str] = {}
        for name in NET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                try:
                    normalize_cidr(value)
                except InvalidRequest as exc:
                    raise _field_error(name, exc) from None
                versions.setdefault(cidr_version(value), name)
        if len(versions) > 1:
            raise InvalidRequest(
                f"{versions[4]} and {versions[6]}: one rule cannot mix IPv4 and IPv6 CIDRs"
            )
        for name in PORT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if protocol not in PORT_PROTOCOLS:
                raise InvalidRequest(f"{name}: ports need protocol tcp or udp")
            try:
                if not isinstance(value, list | tuple):
                    raise InvalidRequest(f"ports must be a list, not {value!r}")
                normalize_ports(value)
            except InvalidRequest as exc:
                raise _field_error(name, exc) from None
        if self.icmp_type is not None or self.icmp_code is not None:
            if protocol not in ICMP_PROTOCOLS:
                field_ = "icmp_type" if self.icmp_type is not None else "icmp_code"
                raise InvalidRequest(f"{field_}: ICMP type and code need protocol icmp or icmpv6")
            if self.icmp_type is None:
                raise InvalidRequest("icmp_code: an ICMP code needs an ICMP type")
            try:
                check_icmp_type(self.icmp_type)
            except InvalidRequest as exc:
                raise _field_error("icmp_type", exc) from None
            if self.icmp_code is not None:
                try:
                    check_icmp_code(self.icmp_code)
                except InvalidRequest as exc:
                    raise _field_error("icmp_code", exc) from None
        if protocol in ICMP_PROTOCOLS and versions:
            wanted = 4 if protocol == "icmp" else 6
            other = next(iter(versions))
            if other != wanted:
                raise InvalidRequest(
                    f"{versions[other]}: an IPv{other} CIDR cannot carry {protocol} traffic"
                )
        return self

    @property
    def ip_version(self) -> int | None:
        """4 or 6 when the rule can only match one IP version, else None."""
        for name in NET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return cidr_version(value)
        protocol = self.protocol
        if protocol is not None and not isinstance(protocol, str):
            protocol = _NAME_BY_NUMBER.get(protocol, protocol)
        if protocol == "icmp":
            return 4
        if protocol == "icmpv6":
            return 6
        return None

    def tags(self) -> set[str]:
        """Every tag this rule matches on (positively or negated)."""
        return {value for name in TAG_FIELDS if (value := getattr(self, name)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: only the keys that are set, negations as ``!key``."""
        data: dict[str, Any] = {"action": self.action}
        for item in fields(self):
            if item.name == "action":
                continue
            value = getattr(self, item.name)
            if value is not None:
                data[dict_key(item.name)] = list(value) if isinstance(value, list) else value
        return data

    @classmethod
    def unknown_keys(cls, data: Mapping[str, Any]) -> list[str]:
        """The keys of a rule's JSON form that this version does not know."""
        known = {item.name for item in fields(cls)}
        return sorted(str(key) for key in data
                      if not isinstance(key, str) or field_name(key) not in known
                      or key != dict_key(field_name(key)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Parse, normalize and validate the JSON form; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise InvalidRequest(f"a rule must be an object, not {data!r}")
        known = {item.name for item in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = field_name(key) if isinstance(key, str) else ""
            if name not in known or key != dict_key(name):
                raise InvalidRequest(f"unknown rule key '{key}'")
            if value is None:
                continue
            try:
                if name == "protocol":
                    value = normalize_protocol(value)
                elif name in NET_FIELDS:
                    value = normalize_cidr(value)
                elif name in PORT_FIELDS:
                    value = normalize_ports(value)
                elif name in TAG_FIELDS:
                    value = check_name(value, "tag")
            except InvalidRequest as exc:
                raise _field_error(key, exc) from None
            values[name] = value
        if "action" not in values:
            raise InvalidRequest("action: a rule needs an action (allow or deny)")
        return cls(**values).validate()


@dataclass
class Profile:
    """A named set of tags and ordered inbound/outbound rules."""

    name: str
    tags: list[str] = field(default_factory=list)
    inbound_rules: list[Rule] = field(default_factory=list)
    outbound_rules: list[Rule] = field(default_factory=list)

    def validate(self) -> Profile:
        """Check the name, tags and every rule; raise :class:`InvalidRequest`. Returns self."""
        try:
            check_name(self.name, "profile name")
        except InvalidRequest as exc:
            raise _field_error("name", exc) from None
        seen: set[str] = set()
        for tag in self.tags:
            try:
                check_name(tag, "tag")
            except InvalidRequest as exc:
                raise _field_error("tags", exc) from None
            if tag in seen:
                raise InvalidRequest(f"tags: tag '{tag}' is listed twice")
            seen.add(tag)
        directions = (("inbound", self.inbound_rules), ("outbound", self.outbound_rules))
        for direction, rules in directions:
            for index, rule in enumerate(rules):
                if not isinstance(rule, Rule):
                    raise InvalidRequest(f"rules.{direction}[{index}]: not a Rule")
                try:
                    rule.validate()
                except InvalidRequest as exc:
                    raise InvalidRequest(f"rules.{direction}[{index}].{exc}") from None
        return self

    def referenced_tags(self) -> set[str]:
        """The tags its rules match on (not its own tags)."""
        tags: set[str] = set()
        for rule in (*self.inbound_rules, *self.outbound_rules):
            tags |= rule.tags()
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": list(self.tags),
            "rules": {
                "inbound": [rule.to_dict() for rule in self.inbound_rules],
                "outbound": [rule.to_dict() for rule in self.outbound_rules],
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Parse and validate the dict form; ``tags`` and ``rules`` may be left out."""
        if not isinstance(data, Mapping):
            raise InvalidRequest(f"a profile must be an object, not {data!r}")
        unknown = sorted(str(key) for key in data if key not in ("name", "tags", "rules"))
        if unknown:
            raise InvalidRequest(f"unknown profile key '{unknown[0]}'")
        if "name" not in data:
            raise InvalidRequest("name: a profile needs a name")
        tags = data.get("tags")
        tags = [] if tags is None else tags
        if not isinstance(tags, list | tuple):
            raise InvalidRequest("tags: must be a list of tags")
        rules = data.get("rules")
        rules = {} if rules is None else rules
        if not isinstance(rules, Mapping):
            raise InvalidRequest("rules: must be an object with 'inbound' and 'outbound' lists")
        extra = sorted(str(key) for key in rules if key not in ("inbound", "outbound"))
        if extra:
            raise InvalidRequest(f"rules: unknown direction '{extra[0]}' (inbound or outbound)")
        parsed: dict[str, list[Rule]] = {}
        for direction in ("inbound", "outbound"):
            items = rules.get(direction)
            items = [] if items is None else items
            if not isinstance(items, list | tuple):
                raise InvalidRequest(f"rules.{direction}: must be a list of rules")
            parsed[direction] = []
            for index, item in enumerate(items):
                try:
                    parsed[direction].append(Rule.from_dict(item))
                except InvalidRequest as exc:
                    raise InvalidRequest(f"rules.{direction}[{index}].{exc}") from None
        return cls(
            name=data["name"], tags=list(tags),
            inbound_rules=parsed["inbound"], outbound_rules=parsed["outbound"],
        ).validate()

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> tuple[Profile, list[str]]:
        """A profile as stored, perhaps by a newer version (a rolling upgrade): keys it
        added are tolerated. A rule with conditions this version does not know cannot
        be enforced as written, so it fails closed: an allow or log rule is left out,
        a deny rule is kept without them (denying more). Returns notes on what was
        left out; anything else malformed is refused as by from_dict."""
        if not isinstance(data, Mapping):
            raise InvalidRequest(f"a profile must be an object, not {data!r}")
        notes = [f"ignored profile key '{key}'" for key in sorted(map(str, data))
                 if key not in ("name", "tags", "rules")]
        cleaned: dict[str, Any] = {k: data[k] for k in ("name", "tags", "rules") if k in data}
        rules = cleaned.get("rules")
        if isinstance(rules, Mapping):
            kept: dict[str, Any] = {}
            for direction in ("inbound", "outbound"):
                items = rules.get(direction)
                if not isinstance(items, list | tuple):
                    kept[direction] = items
                    continue
                kept[direction] = []
                for index, item in enumerate(items):
                    unknown = Rule.unknown_keys(item) if isinstance(item, Mapping) else []
                    if not unknown:
                        kept[direction].append(item)
                    elif item.get("action") == "deny":
                        kept[direction].append(
                            {k: v for k, v in item.items() if k not in unknown})
                        notes.append(f"rules.{direction}[{index}]: deny kept without "
                                     f"unknown key(s) {', '.join(unknown)}")
                    else:
                        notes.append(f"rules.{direction}[{index}]: left out (unknown "
                                     f"key(s) {', '.join(unknown)})")
            notes += [f"ignored rule direction '{key}'" for key in sorted(map(str, rules))
                      if key not in ("inbound", "outbound")]
            cleaned["rules"] = kept
        return cls.from_dict(cleaned), notes

    @classmethod
    def network_default(cls, name: str, tags: Iterable[str] | None = None) -> Profile:
        """The profile a new network gets: tagged with its name, inbound allowed only
        from endpoints carrying that tag, outbound allowed."""
        tag_list = list(tags) if tags is not None else [name]
        return cls(
            name=name, tags=tag_list,
            inbound_rules=[Rule("allow", src_tag=tag) for tag in tag_list],
            outbound_rules=[Rule("allow")],
        ).validate()
