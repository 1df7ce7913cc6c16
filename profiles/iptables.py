"""The only code that runs iptables, ip6tables and ipset.

:class:`PolicyWriter` takes the compiler's :class:`~profiles.compiler.CompiledPolicy`
to the kernel, per IP family, in this order: ``ipset restore`` (sets the rules
reference), one ``iptables-restore --noflush -w`` (``ip6tables-restore``) per table
with the chain edits and, in the same transaction, any hook fixes, then
``ipset restore`` destroying sets no rule refers to any more. The two families are
independent and are written in parallel (one thread each).

``apply`` is incremental: it diffs the new state against the one this writer last
applied and sends only the chains and sets that changed. Sets are updated with
``add``/``del ... -exist`` lines for the members that changed, so the common change,
an endpoint added or removed (only set members, see ``profiles.compiler``), is one
``ipset restore`` per family and no iptables-restore at all. A chain whose old rules
are a subsequence of its new rules (e.g. the dispatch chains when a new profile list
comes into use) is edited with ``-I``/``-A`` instead of being flushed and rewritten.
That matters on the nf_tables backend: a transaction that deletes anything (a flush
is a delete) queues the old rules for destruction after an RCU grace period, and the
tool's exit then waits for that grace period (10-20 ms here); a transaction that only
adds returns in about 3 ms.

``resync`` reads what the kernel holds (``iptables -S`` per table, ``ipset list -n``),
rewrites every set, rewrites every chain of ours whose rules differ from the policy
(or are missing), deletes chains and sets of ours that the policy no longer has,
and puts the hooks back at the top of the built-in chains (deleting any other rule
there that jumps to one of our chains). Chains that already match are left alone:
rewriting tens of thousands of identical rules costs seconds and changes nothing.
Sets are destroyed only after the rules using them are gone, retrying while the
kernel still holds a reference (nf_tables releases it after an RCU grace period).

If an incremental write fails (someone deleted a chain under us, a set went
missing), the family falls back to a resync; iptables-restore transactions are
atomic per table, so the kernel never holds a half-written chain.

With ``netns`` the tools run inside ``/run/netns/<netns>``: each family's thread
enters the namespace (``setns``) before it starts them, which is cheaper than
``nsenter`` or ``ip netns exec`` per command.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from datastore.errors import InvalidRequest, Unavailable
from profiles.compiler import (
    FILTER,
    MAX_CHAIN_NAME,
    NAT,
    CompiledPolicy,
    DesiredState,
    Hook,
    diff,
    is_own_chain,
    is_own_set,
    render_ipset_destroy,
    render_ipset_restore,
)

log = logging.getLogger(__name__)

POLICY_TABLES = (FILTER, NAT)
FAMILIES = (4, 6)
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 300.0
SET_DESTROY_WAIT = 5.0

_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SAFE_CHAIN = re.compile(r"[A-Za-z0-9_.-]+")
_OWN_TARGET = re.compile(r"(?:^|\s)-[jg] (cali-[^\s]+)")
_PROTOCOL_NUMBER = re.compile(r"(^|\s)-p (\d+)(?=\s|$)")
_FAILED_LINE = re.compile(r"(?:line (\d+) failed|Error in line (\d+))")

_T = TypeVar("_T")


class CommandFailed(Unavailable):
    """iptables, ip6tables or ipset exited with an error."""


@dataclass
class ApplyReport:
    """What one apply/resync did, summed over both IP families.

    ``chains_written`` counts chains created, rewritten or edited in place;
    ``hooks_inserted`` the hook rules (re)inserted at the top of built-in chains.
    ``full`` is set when a family was resynced (asked for, the first apply of this
    writer, or a fallback); ``fallback`` when an incremental write failed and a resync
    repaired it (``errors`` holds what failed).
    """

    chains_written: int = 0
    chains_deleted: int = 0
    sets_written: int = 0
    sets_deleted: int = 0
    hooks_inserted: int = 0
    elapsed: float = 0.0
    full: bool = False
    fallback: bool = False
    errors: list[str] = field(default_factory=list)

    def add(self, other: ApplyReport) -> None:
        self.chains_written += other.chains_written
        self.chains_deleted += other.chains_deleted
        self.sets_written += other.sets_written
        self.sets_deleted += other.sets_deleted
        self.hooks_inserted += other.hooks_inserted
        self.full = self.full or other.full
        self.fallback = self.fallback or other.fallback
        self.errors += other.errors

    @property
    def changed(self) -> bool:
        return bool(
            self.chains_written or self.chains_deleted or self.sets_written
            or self.sets_deleted or self.hooks_inserted
        )


# --- running the tools -------------------------------------------------------------------


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a tool (no shell); raise :class:`CommandFailed` with its stderr and, when
    it names a line of the input that failed, that line."""
    try:
        result = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CommandFailed(f"{' '.join(argv)}: {exc}") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        found = _FAILED_LINE.search(message)
        if found and stdin:
            lines = stdin.splitlines()
            number = int(found.group(1) or found.group(2))
            if 0 < number <= len(lines):
                message += f" [line {number}: {lines[number - 1][:300]}]"
        raise CommandFailed(f"{' '.join(argv)} exited {result.returncode}: {message}")
    return result.stdout


def _enter_netns(netns: str) -> None:
    """Move the calling thread into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise CommandFailed(f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _protocol_names(path: str = "/etc/protocols") -> dict[str, str]:
    """number -> name, as iptables prints protocols (``-p 47`` reads back ``-p gre``)."""
    names: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split("#", 1)[0].split()
                if len(words) >= 2 and words[1].isdigit():
                    names.setdefault(words[1], words[0])
    except OSError:
        pass
    return names


def _check_chain(name: str) -> str:
    if not is_own_chain(name) or len(name) > MAX_CHAIN_NAME or not _SAFE_CHAIN.fullmatch(name):
        raise ValueError(f"refusing to write chain {name!r}: not one of ours")
    return name


def _check_rule(rule: str) -> str:
    if "\n" in rule or "\r" in rule:
        raise ValueError(f"refusing to write a rule with a line break: {rule!r}")
    return rule


def _insertions(old: Sequence[str], new: Sequence[str]) -> list[tuple[int, str]] | None:
    """If ``old`` is a subsequence of ``new``: the (1-based position, rule) inserts that
    turn ``old`` into ``new``, in order (position 0 means "append"). Else None."""
    if not old:
        return None
    edits: list[tuple[int, str]] = []
    i = 0
    for j, rule in enumerate(new):
        if i < len(old) and old[i] == rule:
            i += 1
        else:
            edits.append((0 if i == len(old) else j + 1, rule))
    return edits if i == len(old) else None


def _own_target(rule: str) -> str | None:
    match = _OWN_TARGET.search(rule)
    return match.group(1) if match else None


@dataclass
class _Listing:
    """One table as ``iptables -S`` printed it: chain -> rules (without ``-A CHAIN``)."""

    chains: dict[str, list[str]]
    builtins: set[str]


def _parse_listing(text: str) -> _Listing:
    chains: dict[str, list[str]] = {}
    builtins: set[str] = set()
    for line in text.splitlines():
        if line.startswith("-A "):
            name, _, rule = line[3:].partition(" ")
            chains.setdefault(name, []).append(rule)
        elif line.startswith("-N "):
            chains.setdefault(line[3:].strip(), [])
        elif line.startswith("-P "):
            name = line.split()[1]
            builtins.add(name)
            chains.setdefault(name, [])
    return _Listing(chains, builtins)


@dataclass
class _TableEdit:
    """One table's transaction: chains rewritten whole, chains edited by inserts,
    chains deleted, and hook lines (``-D``/``-I`` in built-in chains)."""

    table: str
    rewrite: dict[str, Sequence[str]] = field(default_factory=dict)
    inserts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    hook_lines: list[str] = field(default_factory=list)
    hooks_inserted: int = 0

    @property
    def empty(self) -> bool:
        return not (self.rewrite or self.inserts or self.delete or self.hook_lines)

    @property
    def chains_written(self) -> int:
        return len(self.rewrite) + len(self.inserts)

    def render(self) -> str:
        """``iptables-restore --noflush`` input. Declared chains are created or flushed;
        deleted chains are flushed first and removed last, so chains that referred to
        them can be rewritten in the same transaction."""
        rewrite = sorted(self.rewrite)
        doomed = sorted(set(self.delete) - set(rewrite))
        lines = [f"*{self.table}"]
        lines += [f":{_check_chain(name)} - [0:0]" for name in (*rewrite, *doomed)]
        for name in rewrite:
            lines += [f"-A {name} {_check_rule(rule)}" for rule in self.rewrite[name]]
        for name in sorted(self.inserts):
            _check_chain(name)
            for position, rule in self.inserts[name]:
                _check_rule(rule)
                if position:
                    lines.append(f"-I {name} {position} {rule}")
                else:
                    lines.append(f"-A {name} {rule}")
        lines += [_check_rule(line) for line in self.hook_lines]
        lines += [f"-X {name}" for name in doomed]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


# --- the writer ----------------------------------------------------------------------------


class PolicyWriter:
    """Programs compiled policy into the kernel of one network namespace.

    ``netns``: a name under /run/netns (tests, benchmarks); None means the namespace
    this process runs in. Thread-safe: calls are serialized.
    """

    def __init__(self, netns: str | None = None) -> None:
        if netns is not None:
            if not isinstance(netns, str) or not _NETNS_NAME.fullmatch(netns):
                raise InvalidRequest(f"bad network namespace name {netns!r}")
            if not os.path.exists(os.path.join(NETNS_DIR, netns)):
                raise InvalidRequest(f"network namespace {netns!r} does not exist")
        self.netns = netns
        self._applied: dict[int, DesiredState | None] = {4: None, 6: None}
        self._lock = threading.Lock()
        self._protocols = _protocol_names()

    # -- public API ----------------------------------------------------------------------

    def apply(self, policy: CompiledPolicy) -> ApplyReport:
        """Write what changed since this writer's last apply/resync (a resync the first
        time, and for a family whose last write failed)."""
        return self._each_family(policy, self._apply_family)

    def resync(self, policy: CompiledPolicy) -> ApplyReport:
        """Bring the kernel to ``policy`` whatever it holds now (see the module doc)."""
        return self._each_family(policy, self._resync_family)

    def hooks_intact(self) -> bool:
        """Whether every hook is at the top of its built-in chain and the chains the
        hooks jump to still hold what was applied (a handful of cheap ``iptables -S``
        calls). False when nothing was applied yet."""
        with self._lock:
            states = [state for v in FAMILIES if (state := self._applied[v]) is not None]
            if len(states) != len(FAMILIES):
                return False
            return all(self._parallel([lambda s=state: self._family_intact(s) for state in states]))

    def remove_all(self) -> None:
        """Delete our hooks, chains and sets in both families (uninstall, test cleanup)."""
        with self._lock:
            for version in FAMILIES:
                self._applied[version] = None
            self._parallel([lambda v=version: self._remove_family(v) for version in FAMILIES])

    # -- families ------------------------------------------------------------------------

    def _each_family(
        self, policy: CompiledPolicy, step: Callable[[DesiredState], ApplyReport]
    ) -> ApplyReport:
        started = time.perf_counter()
        with self._lock:
            reports = self._parallel(
                [lambda v=version: step(policy.family(v)) for version in FAMILIES]
            )
        total = ApplyReport()
        for report in reports:
            total.add(report)
        total.elapsed = time.perf_counter() - started
        return total

    def _parallel(self, jobs: Sequence[Callable[[], _T]]) -> list[_T]:
        """Run each job in its own thread (inside the namespace); re-raise the first
        failure once all have finished."""
        results: list[_T | None] = [None] * len(jobs)
        errors: list[BaseException | None] = [None] * len(jobs)

        def work(index: int) -> None:
            try:
                if self.netns is not None:
                    _enter_netns(self.netns)
                results[index] = jobs[index]()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors[index] = exc

        threads = [
            threading.Thread(target=work, args=(index,), name=f"policy-{index}", daemon=True)
            for index in range(len(jobs))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for error in errors:
            if error is not None:
                raise error
        return cast(list[_T], results)

    def _apply_family(self, new: DesiredState) -> ApplyReport:
        version = new.version
        old = self._applied[version]
        if old is None:
            return self._resync_family(new)
        changes = diff(old, new)
        if changes.hooks_changed:
            return self._resync_family(new)
        report = ApplyReport()
        if changes.empty:
            return report
        try:
            changed_sets = {name: new.ipsets[name] for name in changes.changed_sets}
            self._ipset_restore(render_ipset_restore(changed_sets, old.ipsets))
            report.sets_written = len(changed_sets)
            for table in POLICY_TABLES:
                old_chains = old.tables.get(table, {})
                new_chains = new.tables.get(table, {})
                edit = _TableEdit(table)
                for name in changes.changed_chains.get(table, []):
                    rules = new_chains[name]
                    before = old_chains.get(name)
                    edits = _insertions(before, rules) if before is not None else None
                    if edits is None:
                        edit.rewrite[name] = rules
                    else:
                        edit.inserts[name] = edits
                edit.delete = list(changes.deleted_chains.get(table, []))
                self._restore(version, edit)
                report.chains_written += edit.chains_written
                report.chains_deleted += len(edit.delete)
            self._destroy_sets(version, changes.deleted_sets)
            report.sets_deleted = len(changes.deleted_sets)
        except (CommandFailed, ValueError) as exc:
            self._applied[version] = None
            log.warning("IPv%d policy update failed, resyncing: %s", version, exc)
            repaired = self._resync_family(new)
            repaired.fallback = True
            repaired.errors.insert(0, str(exc))
            return repaired
        self._applied[version] = new
        return report

    def _resync_family(self, new: DesiredState) -> ApplyReport:
        version = new.version
        self._applied[version] = None
        report = ApplyReport(full=True)
        present_sets = self._own_sets(version)
        self._ipset_restore(render_ipset_restore(new.ipsets))
        report.sets_written = len(new.ipsets)
        for table in POLICY_TABLES:
            listing = self._list(version, table)
            desired = new.tables.get(table, {})
            edit = _TableEdit(table)
            for name, rules in desired.items():
                if self._canonical(rules) != listing.chains.get(name):
                    edit.rewrite[name] = rules
            edit.delete = sorted(
                name for name in listing.chains
                if is_own_chain(name) and name not in desired and name not in listing.builtins
            )
            self._fix_hooks(edit, listing, new.hooks)
            self._restore(version, edit)
            report.chains_written += edit.chains_written
            report.chains_deleted += len(edit.delete)
            report.hooks_inserted += edit.hooks_inserted
        leftover = sorted(present_sets - set(new.ipsets))
        self._destroy_sets(version, leftover)
        report.sets_deleted = len(leftover)
        self._applied[version] = new
        return report

    def _family_intact(self, state: DesiredState) -> bool:
        version = state.version
        for table in POLICY_TABLES:
            hooks = [hook for hook in state.hooks if hook.table == table]
            chains = state.tables.get(table, {})
            targets = sorted({t for hook in hooks if (t := _own_target(hook.rule)) is not None})
            try:
                if table == NAT:
                    listing = self._list(version, table)  # small: list it whole
                else:
                    listing = _Listing({}, set())
                    for name in sorted({hook.chain for hook in hooks}) + targets:
                        part = self._list(version, table, name)
                        listing.chains.update(part.chains)
                        listing.builtins |= part.builtins
            except CommandFailed:
                return False  # e.g. a chain of ours is gone
            probe = _TableEdit(table)
            self._fix_hooks(probe, listing, hooks)
            if probe.hook_lines:
                return False
            if table == NAT:
                present = {name for name in listing.chains if is_own_chain(name)}
                if present != set(chains):
                    return False
                names = sorted(present)
            else:
                names = targets
            for name in names:
                if self._canonical(chains.get(name, [])) != listing.chains.get(name):
                    return False
        return True

    def _remove_family(self, version: int) -> None:
        for table in POLICY_TABLES:
            listing = self._list(version, table)
            edit = _TableEdit(table)
            edit.delete = sorted(
                name for name in listing.chains
                if is_own_chain(name) and name not in listing.builtins
            )
            self._fix_hooks(edit, listing, [])
            self._restore(version, edit)
        self._destroy_sets(version, sorted(self._own_sets(version)))

    # -- pieces --------------------------------------------------------------------------

    def _fix_hooks(self, edit: _TableEdit, listing: _Listing, hooks: Iterable[Hook]) -> None:
        """Add to ``edit`` what puts the table's hooks at the top of their built-in
        chains, in order, once: every rule of a built-in chain that jumps to one of
        our chains is deleted (by its spec) and the hooks are inserted at 1..k. A
        chain whose first rules are exactly its hooks and that refers to our chains
        nowhere else is left alone."""
        wanted: dict[str, list[str]] = {}
        for hook in hooks:
            if hook.table == edit.table:
                wanted.setdefault(hook.chain, []).append(hook.rule)
        for chain in sorted(listing.builtins | set(wanted)):
            want = self._canonical(wanted.get(chain, []))
            present = listing.chains.get(chain, [])
            refs = [rule for rule in present if _own_target(rule) is not None]
            if present[: len(want)] == want and len(refs) == len(want):
                continue
            edit.hook_lines += [f"-D {chain} {rule}" for rule in refs]
            edit.hook_lines += [
                f"-I {chain} {position} {rule}"
                for position, rule in enumerate(wanted.get(chain, []), start=1)
            ]
            edit.hooks_inserted += len(want)

    def _canonical(self, rules: Sequence[str]) -> list[str]:
        """Rules as ``iptables -S`` prints them (protocol numbers become names)."""
        result = list(rules)
        for index, rule in enumerate(result):
            if "-p " in rule:
                result[index] = _PROTOCOL_NUMBER.sub(
                    lambda m: f"{m.group(1)}-p {self._protocols.get(m.group(2), m.group(2))}",
                    rule,
                )
        return result

    def _tool(self, version: int, name: str) -> str:
        return ("iptables" if version == 4 else "ip6tables") + name

    def _list(self, version: int, table: str, chain: str | None = None) -> _Listing:
        argv = [self._tool(version, ""), "-w", "-t", table, "-S"]
        if chain is not None:
            argv.append(chain)
        return _parse_listing(_run(argv))

    def _restore(self, version: int, edit: _TableEdit) -> None:
        if not edit.empty:
            _run([self._tool(version, "-restore"), "--noflush", "-w"], edit.render())

    def _ipset_restore(self, text: str) -> None:
        if text:
            _run(["ipset", "restore"], text)

    def _destroy_sets(self, version: int, names: Sequence[str]) -> None:
        """Destroy sets the rules no longer use. nf_tables drops a deleted rule's
        reference to its set only after an RCU grace period, so a set can still be
        "in use by a kernel component" right after the iptables-restore that deleted
        the last rule using it: retry for up to SET_DESTROY_WAIT seconds."""
        pending = list(names)
        deadline = time.monotonic() + SET_DESTROY_WAIT
        delay = 0.01
        while pending:
            try:
                self._ipset_restore(render_ipset_destroy(pending))
                return
            except CommandFailed as exc:
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            present = self._own_sets(version)
            pending = [name for name in pending if name in present]

    def _own_sets(self, version: int) -> set[str]:
        prefix = f"cali{version}-"
        return {
            name for name in _run(["ipset", "list", "-n"]).split()
            if is_own_set(name) and name.startswith(prefix)
        }

