"""The CLI rule syntax (calicoctl's familiar grammar): parse argv words, print back.

::

    (allow|deny) [PROTOCOL [type T [code C]]] [from CLAUSE] [to CLAUSE]

    PROTOCOL  tcp | udp | icmp | icmpv6 | a number 1-255
    CLAUSE    one or more of, in any order, each at most once per clause:
              [not] tag TAG | [not] cidr CIDR | [not] ports PORTS
    PORTS     80,443,8000:8080   (ports need protocol tcp or udp)

``from`` and ``to`` may come in either order, each at most once. Keywords are case
insensitive; values (tags) are not. Examples::

    allow
    allow tcp to ports 80,443
    deny icmp type 8 code 0 from cidr 10.0.0.0/8
    allow tcp from tag web not cidr 10.1.0.0/16 to ports 8000:8080 not ports 8081

Errors are :class:`InvalidRequest` and say which word (1-based) is wrong and what
was expected there, e.g. ``unknown keyword 'frm' at word 3; expected one of: from, to``.

``format_rule`` prints a rule in this grammar in a fixed order (protocol, type, code;
from before to; inside a clause tag, cidr, ports, each positive before negated), so
``parse_rule(format_rule(r)) == r`` for every valid rule in normal form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from datastore.errors import InvalidRequest
from profiles.model import (
    ACTIONS,
    ICMP_PROTOCOLS,
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    Port,
    Rule,
    check_icmp_code,
    check_icmp_type,
    check_name,
    normalize_cidr,
    normalize_ports,
    normalize_protocol,
)

CLAUSES = ("from", "to")
MATCHES = ("tag", "cidr", "ports")
_SIDE = {"from": "src", "to": "dst"}
_FIELD = {"tag": "tag", "cidr": "net", "ports": "ports"}


class _Words:
    """The words with a cursor; errors name the 1-based position."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def peek_keyword(self) -> str | None:
        word = self.peek()
        return word.lower() if word is not None else None

    def take(self) -> str:
        word = self.words[self.pos]
        self.pos += 1
        return word

    def value_after(self, keyword: str) -> tuple[str, int]:
        """The word after ``keyword`` (just taken) and its 1-based position."""
        if self.pos >= len(self.words):
            raise InvalidRequest(f"missing value after '{keyword}' at word {self.pos}")
        return self.take(), self.pos

    def fail(self, message: str, position: int | None = None) -> InvalidRequest:
        where = self.pos if position is None else position
        return InvalidRequest(f"{message} at word {where}")

    def unknown(self, expected: Sequence[str]) -> InvalidRequest:
        word = self.words[self.pos]
        return InvalidRequest(
            f"unknown keyword '{word}' at word {self.pos + 1}; "
            f"expected one of: {', '.join(expected)}"
        )


def _at(exc: InvalidRequest, position: int) -> InvalidRequest:
    """Add the position, ahead of a parenthesised hint: "bad thing at word 4 (hint)"."""
    head, sep, tail = str(exc).partition(" (")
    return InvalidRequest(f"{head} at word {position}{sep}{tail}")


def parse_rule(words: Sequence[str] | str) -> Rule:
    """Parse one rule from argv words (or a string, split on whitespace).

    Returns a validated :class:`Rule` in normal form; raises :class:`InvalidRequest`.
    """
    if isinstance(words, str):
        words = words.split()
    cursor = _Words(words)
    if cursor.peek() is None:
        raise InvalidRequest("empty rule; expected allow or deny")
    action = cursor.peek_keyword()
    if action not in ACTIONS:
        raise cursor.unknown(ACTIONS)
    cursor.take()
    values: dict[str, object] = {"action": action}

    # Optional protocol, with ICMP type and code.
    keyword = cursor.peek_keyword()
    if keyword is not None and keyword not in CLAUSES:
        if keyword in PROTOCOL_NAMES or keyword.isdigit():
            word = cursor.take()
            try:
                values["protocol"] = normalize_protocol(word)
            except InvalidRequest as exc:
                raise _at(exc, cursor.pos) from None
        elif keyword in ("type", "code"):
            raise cursor.fail(f"'{keyword}' needs protocol icmp or icmpv6", cursor.pos + 1)
        else:
            raise cursor.unknown((*PROTOCOL_NAMES, "a protocol number", *CLAUSES))
    protocol = values.get("protocol")
    if protocol in ICMP_PROTOCOLS and cursor.peek_keyword() == "type":
        cursor.take()
        word, position = cursor.value_after("type")
        values["icmp_type"] = _icmp_number(word, position, "type", check_icmp_type)
        if cursor.peek_keyword() == "code":
            cursor.take()
            word, position = cursor.value_after("code")
            values["icmp_code"] = _icmp_number(word, position, "code", check_icmp_code)
    keyword = cursor.peek_keyword()
    if keyword in ("type", "code"):
        if protocol not in ICMP_PROTOCOLS:
            raise cursor.fail(f"'{keyword}' needs protocol icmp or icmpv6", cursor.pos + 1)
        if keyword == "type" or "icmp_code" in values:
            raise cursor.fail(f"'{keyword}' given twice", cursor.pos + 1)
        raise cursor.fail("'code' needs an ICMP type before it", cursor.pos + 1)

    # from / to clauses.
    seen_clauses: set[str] = set()
    while cursor.peek() is not None:
        keyword = cursor.peek_keyword()
        if keyword not in CLAUSES:
            expected = [clause for clause in CLAUSES if clause not in seen_clauses]
            raise cursor.unknown(expected or ["end of rule"])
        if keyword in seen_clauses:
            raise cursor.fail(f"'{keyword}' clause given twice", cursor.pos + 1)
        seen_clauses.add(keyword)
        cursor.take()
        _parse_clause(cursor, keyword, protocol, values, seen_clauses)

    try:
        return Rule(**values).validate()  # type: ignore[arg-type]  # values are checked
    except InvalidRequest as exc:
        raise InvalidRequest(f"invalid rule: {exc}") from None


def _icmp_number(word: str, position: int, what: str, check: Callable[[int], int]) -> int:
    if not word.isdigit():
        raise InvalidRequest(f"invalid ICMP {what} '{word}' at word {position}")
    try:
        return check(int(word))
    except InvalidRequest as exc:
        raise _at(exc, position) from None


def _parse_clause(
    cursor: _Words,
    clause: str,
    protocol: object,
    values: dict[str, object],
    seen_clauses: set[str],
) -> None:
    clause_position = cursor.pos
    side = _SIDE[clause]
    found = 0
    while True:
        keyword = cursor.peek_keyword()
        if keyword is None or keyword in CLAUSES:
            break
        negated = keyword == "not"
        start = cursor.pos + 1
        if negated:
            cursor.take()
            keyword = cursor.peek_keyword()
            if keyword not in MATCHES:
                if keyword is None:
                    raise cursor.fail("'not' must be followed by tag, cidr or ports")
                raise cursor.unknown(MATCHES)
        elif keyword not in MATCHES:
            others = [c for c in CLAUSES if c not in seen_clauses]
            raise cursor.unknown((*MATCHES, "not", *others))
        cursor.take()
        keyword_position = cursor.pos
        name = f"{'not_' if negated else ''}{side}_{_FIELD[keyword]}"
        label = f"{'not ' if negated else ''}{keyword}"
        if name in values:
            raise cursor.fail(f"'{label}' given twice in the '{clause}' clause", start)
        if keyword == "ports" and protocol not in PORT_PROTOCOLS:
            raise cursor.fail("ports need protocol tcp or udp", keyword_position)
        word, position = cursor.value_after(keyword)
        try:
            if keyword == "tag":
                values[name] = check_name(word, "tag")
            elif keyword == "cidr":
                values[name] = normalize_cidr(word)
            else:
                values[name] = normalize_ports(word)
        except InvalidRequest as exc:
            raise _at(exc, position) from None
        found += 1
    if not found:
        raise cursor.fail(f"'{clause}' needs tag, cidr or ports after it", clause_position)


def _ports_text(ports: Sequence[Port]) -> str:
    return ",".join(str(port) for port in ports)


def format_words(rule: Rule) -> list[str]:
    """The rule as argv words (see :func:`format_rule`)."""
    words = [rule.action]
    if rule.protocol is not None:
        words.append(str(rule.protocol))
    if rule.icmp_type is not None:
        words += ["type", str(rule.icmp_type)]
        if rule.icmp_code is not None:
            words += ["code", str(rule.icmp_code)]
    for clause, side in _SIDE.items():
        clause_words: list[str] = []
        for keyword in MATCHES:
            for negated in (False, True):
                value = getattr(rule, f"{'not_' if negated else ''}{side}_{_FIELD[keyword]}")
                if value is None:
                    continue
                if negated:
                    clause_words.append("not")
                clause_words += [keyword, _ports_text(value) if keyword == "ports" else value]
        if clause_words:
            words += [clause, *clause_words]
    return words


def format_rule(rule: Rule) -> str:
    """The rule in the CLI grammar, e.g. ``allow tcp from tag web to ports 80,443``."""
    return " ".join(format_words(rule))
