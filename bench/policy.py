"""How fast does policy reach the kernel? 50 profiles, N endpoints, in a throwaway
network namespace, against a naive writer that issues one command per rule.

Measures, for each N:
  (a) one more endpoint enforced: compile (with a CompileCache, as the agent can) +
      PolicyWriter.apply of the policy with N+1 endpoints after N are applied, the
      median of several additions; the naive baseline issues the new endpoint's rules
      (and set members, and dispatch rules) one `iptables`/`ipset` command each;
  (b) a full resync: PolicyWriter.resync into an empty namespace (cold: every chain
      and set written) and into one that already holds the policy (warm: read,
      compare, nothing rewritten); the naive baseline creates every set member, chain
      and rule with one command each into an empty namespace (timed up to
      --naive-full-max endpoints and extrapolated linearly beyond, saying so);
  (c) the number of iptables rules (IPv4 + IPv6, filter + nat), counted in the kernel.

Usage (root): .venv/bin/python bench/policy.py [--sizes 100,1000,5000] [--additions 7]
              [--naive-full-max 1000] [--no-write]
Writes the table into the "Policy programming (issue 3)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import random
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiles.compiler import (  # noqa: E402
    CompileCache,
    CompiledPolicy,
    DesiredState,
    Endpoint,
    Pool,
    PortMapping,
    compile_policy,
    diff,
)
from profiles.grammar import parse_rule  # noqa: E402
from profiles.iptables import PolicyWriter  # noqa: E402
from profiles.model import Profile  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SECTION = "## Policy programming (issue 3)"
POOLS = [Pool("10.0.0.0/8", nat_outgoing=True), Pool("fd00::/48")]
NETWORKS = 60
NAIVE_FULL_LIMIT = 120.0  # seconds: beyond this the naive full write is extrapolated
_T = TypeVar("_T")

NOTES = """\
Reproduce: `sudo .venv/bin/python bench/policy.py` (about a minute; it creates and deletes
its own `cnmbench-*` network namespaces and rewrites this section; `--no-write` only
prints). The workload: 50 profiles (25 network defaults; 15 services with 7 rules each:
a deny, tags with port lists and ranges, an 18-port list that multiport splits in two,
a CIDR with a hole, ICMP/ICMPv6 types, UDP; 10 database-style ones with a negated tag,
negated ports and outbound rules), 60 networks whose profile lists hold 1-3 of them
(Docker attaches profiles per network, so containers of a network share one list),
endpoints spread over the networks with an IPv4 and an IPv6 address each, one in 100
publishing a port, pools 10.0.0.0/8 (nat-outgoing) and fd00::/48.

- (a) "one more endpoint": compile = `compile_policy(..., cache=CompileCache())` of
  all N+1 endpoints (the second table: without the cache); writer =
  `PolicyWriter.apply`. Naive = the same change as one `iptables`/`ipset` command per
  rule, set member and chain. (b) cold = `resync` into an empty namespace (every chain
  and set written); warm = `resync` when the kernel already holds the policy (the
  periodic case: it reads `iptables -S` per table, compares, rewrites nothing). Naive =
  every set member, chain and rule with its own command into an empty namespace;
  where that would take over 2 minutes (at 5,000: each command is a commit, and commits
  get slower as the table grows) it is extrapolated linearly from 1,000: a lower bound.
  (c) counted in the kernel with `iptables -S`/`ip6tables -S`, filter and nat.
- Targets: (b) <= 2 s at 5,000 endpoints is met (cold). (c) is linear: about 5 rules
  per endpoint per family, independent of how many profiles an endpoint has (they are
  tried in a chain shared by every endpoint with the same profile list). (a) <= 20 ms
  flat is **missed**: the writer alone takes about 20 ms at 5,000 endpoints (18-22 ms
  over runs: at the target, not well under it), the compile adds 45-50 ms, and
  neither is flat. Why, measured:
  1. `compile_policy` recompiles every endpoint on every change: O(N) Python, about
     130-160 ms at 5,000 endpoints. `CompileCache` (reusing per-endpoint results, profile
     renderings and dispatch subtrees) cuts it about 3x but still visits all N.
  2. The kernel: on every nf_tables commit that adds a rule, `nft_table_validate`
     walks every chain reachable from the hooks (found with `perf`), so a commit costs
     about 0.2 us per rule of the table: ~6 ms per family at 5,000 endpoints, and the
     IPv4 and IPv6 commits serialize on the namespace's commit mutex.
  What the writer does about what it controls: edits a chain with `-I`/`-A` when the
  old rules are a subsequence of the new ones (a flush queues rules for destruction
  and the tool's exit then waits an RCU grace period, 10-20 ms here); both families in
  parallel; `setns` in its own threads instead of `nsenter` per command (1 ms each).
  In the compiler: profile lists in shared chains took the rules per endpoint from
  ~15 to ~5 per family (commit 15 -> 6 ms, cold resync 3.6 -> 1.5 s at 5,000).
  To make (a) flat: have the agent feed the compiler the endpoints that changed (the
  datastore watch names them) instead of recompiling all, and match endpoints with
  ipsets (`hash:net,iface` for anti-spoofing and for the members of each profile list)
  so that a new endpoint is only set members and needs no iptables commit at all.
- `hooks_intact` (the cheap check: hooks on top, top chains unchanged) costs ~15 ms at
  any size; a warm `resync` reads the whole ruleset (about 1 s of CPU at 5,000).
"""


# --- the workload ---------------------------------------------------------------------------


def make_profiles() -> dict[str, Profile]:
    """50 profiles: 25 network defaults, 15 services, 10 databases/admin-style ones."""
    profiles: dict[str, Profile] = {}
    for i in range(25):
        profiles[f"net{i}"] = Profile.network_default(f"net{i}")
    for i in range(15):
        ports = ",".join(str(8000 + 7 * k) for k in range(18))  # > 15: two multiport rules
        profiles[f"svc{i}"] = Profile(f"svc{i}", [f"svc{i}"], [parse_rule(text) for text in (
            "deny tcp to ports 22",
            f"allow tcp from tag net{i} to ports 80,443,8080:8090",
            f"allow tcp from tag svc{(i + 1) % 15} to ports {ports}",
            "allow tcp from cidr 10.0.0.0/8 not cidr 10.99.0.0/16 to ports 9100",
            "allow icmp type 8",
            "allow icmpv6 type 128",
            "allow udp from tag net0 to ports 53,123",
        )], [parse_rule("allow")])
    for i in range(10):
        profiles[f"db{i}"] = Profile(f"db{i}", [f"db{i}", "databases"], [
            parse_rule(text) for text in (
                f"allow tcp from tag svc{i} to ports 5432",
                "allow tcp from tag admin to ports 22",
                f"deny from not tag svc{i}",
                "allow udp to not ports 1:1023",
            )
        ], [parse_rule(text) for text in (
            "allow udp to ports 53",
            "allow tcp to cidr 10.0.0.0/8",
            "deny",
        )])
    return profiles


def make_networks(profiles: dict[str, Profile], rng: random.Random) -> list[list[str]]:
    """Docker attaches profiles per network: 60 networks, each with its default profile
    and 0-2 more, shared by every container on it."""
    extras = [name for name in profiles if not name.startswith("net")]
    networks = []
    for i in range(NETWORKS):
        names = [f"net{i % 25}"]
        names += rng.sample(extras, rng.randint(0, 2))
        networks.append(names)
    return networks


def make_endpoint(index: int, networks: list[list[str]], rng: random.Random) -> Endpoint:
    return Endpoint(
        id=f"{index:08x}" + secrets.token_hex(28),
        iface="cali" + f"{rng.getrandbits(44):011x}",
        ipv4=[f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"],
        ipv6=[f"fd00::{index // 65536:x}:{index % 65536:x}"],
        profiles=networks[index % len(networks)],
    )


def make_mappings(endpoints: list[Endpoint]) -> list[PortMapping]:
    """One endpoint in 100 publishes a port."""
    return [PortMapping(e.ipv4[0], "tcp", 20000 + i, 80) for i, e in enumerate(endpoints[::100])]


# --- namespaces and commands ------------------------------------------------------------------


@contextmanager
def namespace() -> Iterator[str]:
    name = f"cnmbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(ns: str, func: Callable[[], _T]) -> _T:
    """Run ``func`` in a thread that entered ``ns`` (its child processes run there)."""
    result: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {result.stderr.strip()}")


def kernel_rules(ns: str) -> int:
    def count() -> int:
        total = 0
        for tool in ("iptables", "ip6tables"):
            for table in ("filter", "nat"):
                out = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True,
                                     text=True, check=True).stdout
                total += sum(1 for line in out.splitlines() if line.startswith("-A "))
        return total
    return inside(ns, count)


# --- the naive writer: one command per set member, chain and rule ------------------------------


def _tool(version: int) -> str:
    return "iptables" if version == 4 else "ip6tables"


def naive_full_commands(policy: CompiledPolicy) -> list[list[str]]:
    commands: list[list[str]] = []
    for state in (policy.v4, policy.v6):
        tool = _tool(state.version)
        for name, ipset in sorted(state.ipsets.items()):
            commands.append(["ipset", "create", name, ipset.type, "family", ipset.family])
            commands += [["ipset", "add", name, member] for member in sorted(ipset.members)]
        for table, chains in state.tables.items():
            commands += [[tool, "-w", "-t", table, "-N", name] for name in chains]
            for name, rules in chains.items():
                commands += [[tool, "-w", "-t", table, "-A", name, *shlex.split(rule)]
                             for rule in rules]
        for hook in state.hooks:
            commands.append([tool, "-w", "-t", hook.table, "-I", hook.chain, "1",
                             *shlex.split(hook.rule)])
    return commands


def naive_delta_commands(old: DesiredState, new: DesiredState) -> list[list[str]]:
    """The change from ``old`` to ``new`` with one command per set member and rule:
    new chains created and filled rule by rule, existing ones given the new rules
    with -I (the cheapest naive way), or flushed and refilled."""
    tool = _tool(new.version)
    changes = diff(old, new)
    commands: list[list[str]] = []
    for name in changes.changed_sets:
        before = old.ipsets.get(name)
        after = new.ipsets[name]
        if before is None:
            commands.append(["ipset", "create", name, after.type, "family", after.family])
        members = before.members if before is not None else frozenset()
        commands += [["ipset", "add", name, m] for m in sorted(after.members - members)]
        commands += [["ipset", "del", name, m] for m in sorted(members - after.members)]
    for table, names in changes.changed_chains.items():
        for name in names:
            rules = new.tables[table][name]
            before_rules = old.tables.get(table, {}).get(name)
            base = [tool, "-w", "-t", table]
            if before_rules is None:
                commands.append([*base, "-N", name])
                commands += [[*base, "-A", name, *shlex.split(r)] for r in rules]
                continue
            j = i = 0
            inserts = []
            for j, rule in enumerate(rules):
                if i < len(before_rules) and before_rules[i] == rule:
                    i += 1
                else:
                    inserts.append((j + 1, rule))
            if i == len(before_rules):
                commands += [[*base, "-I", name, str(p), *shlex.split(r)] for p, r in inserts]
            else:
                commands.append([*base, "-F", name])
                commands += [[*base, "-A", name, *shlex.split(r)] for r in rules]
    return commands


def run_commands(ns: str, commands: list[list[str]]) -> float:
    def go() -> float:
        started = time.perf_counter()
        for argv in commands:
            run(argv)
        return time.perf_counter() - started
    return inside(ns, go)


# --- the measurements -------------------------------------------------------------------------


@dataclass
class Result:
    endpoints: int
    rules: int
    compiled_rules: int
    full_compile_s: float
    add_compile_ms: float
    add_compile_uncached_ms: float
    add_writer_ms: float
    add_naive_ms: float
    add_naive_commands: int
    cold_s: float
    warm_s: float
    intact_ms: float
    naive_full_s: float
    naive_full_commands: int
    naive_extrapolated: bool
    naive_predicted_s: float


def measure(size: int, additions: int, naive_full_max: int,
            naive_rate: list[tuple[int, float]]) -> Result:
    rng = random.Random(size)
    profiles = make_profiles()
    networks = make_networks(profiles, rng)
    endpoints = [make_endpoint(i, networks, rng) for i in range(size)]
    mappings = make_mappings(endpoints)
    started = time.perf_counter()
    policy = compile_policy(endpoints, profiles, POOLS, mappings)
    full_compile = time.perf_counter() - started
    assert not policy.warnings, policy.warnings[:3]

    with namespace() as ns:
        writer = PolicyWriter(netns=ns)
        started = time.perf_counter()
        writer.resync(policy)
        cold = time.perf_counter() - started
        warm_runs = []
        for _ in range(3):
            started = time.perf_counter()
            report = writer.resync(policy)
            warm_runs.append(time.perf_counter() - started)
            assert report.chains_written == 0, report
        warm = statistics.median(warm_runs)
        started = time.perf_counter()
        assert writer.hooks_intact()
        intact = time.perf_counter() - started
        rules = kernel_rules(ns)

        # (a): the agent's path, with a compile cache primed by the policy at N.
        cache = CompileCache()
        compile_policy(endpoints, profiles, POOLS, mappings, cache=cache)
        compile_ms, uncached_ms, writer_ms = [], [], []
        current = list(endpoints)
        for k in range(additions):
            current.append(make_endpoint(size + k, networks, rng))
            started = time.perf_counter()
            grown = compile_policy(current, profiles, POOLS, mappings, cache=cache)
            compiled = time.perf_counter()
            report = writer.apply(grown)
            applied = time.perf_counter()
            assert not report.full and report.chains_written, report
            compile_ms.append((compiled - started) * 1000)
            writer_ms.append((applied - compiled) * 1000)
            started = time.perf_counter()
            compile_policy(current, profiles, POOLS, mappings)
            uncached_ms.append((time.perf_counter() - started) * 1000)
            policy = grown

        # (a) naive: the next additions, one command per rule and set member.
        naive_ms, naive_counts = [], []
        for k in range(additions, additions + max(3, additions // 2)):
            current.append(make_endpoint(size + k, networks, rng))
            grown = compile_policy(current, profiles, POOLS, mappings, cache=cache)
            commands = [c for v in (4, 6)
                        for c in naive_delta_commands(policy.family(v), grown.family(v))]
            naive_ms.append(run_commands(ns, commands) * 1000)
            naive_counts.append(len(commands))
            policy = grown
        writer.remove_all()

    # (b) naive: everything, one command each, into an empty namespace.
    base = compile_policy(endpoints, profiles, POOLS, mappings)
    commands = naive_full_commands(base)
    # What one command costs at this size (from the naive additions above): a commit
    # gets slower as the table grows, so this predicts the full run better than a
    # line through the smaller sizes.
    per_command = statistics.median(naive_ms) / 1000 / statistics.median(naive_counts)
    predicted = per_command * len(commands)
    if size <= naive_full_max and (predicted <= NAIVE_FULL_LIMIT or not naive_rate):
        with namespace() as ns:
            naive_full = run_commands(ns, commands)
        naive_rate.append((len(commands), naive_full))
        extrapolated = False
    else:
        # Linear in the number of commands from the largest size measured: a lower
        # bound (the per-command cost grows with the table).
        measured_commands, measured_seconds = naive_rate[-1]
        naive_full = measured_seconds * len(commands) / measured_commands
        extrapolated = True

    return Result(
        endpoints=size, rules=rules, compiled_rules=base.v4.rule_count() + base.v6.rule_count(),
        full_compile_s=full_compile,
        add_compile_ms=statistics.median(compile_ms),
        add_compile_uncached_ms=statistics.median(uncached_ms),
        add_writer_ms=statistics.median(writer_ms),
        add_naive_ms=statistics.median(naive_ms),
        add_naive_commands=round(statistics.median(naive_counts)),
        cold_s=cold, warm_s=warm, intact_ms=intact * 1000,
        naive_full_s=naive_full, naive_full_commands=len(commands),
        naive_extrapolated=extrapolated, naive_predicted_s=predicted,
    )


def table(results: list[Result]) -> str:
    lines = [
        "| endpoints | (c) iptables rules, v4+v6 | (a) compile ms | (a) writer ms "
        "| (a) total ms | (a) naive ms (commands) | (a) naive / writer | (b) resync cold s "
        "| (b) resync warm s | (b) naive s (commands) | (b) naive / cold |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        total = r.add_compile_ms + r.add_writer_ms
        naive = f"{r.naive_full_s:.1f}"
        if r.naive_extrapolated:
            naive = (f">= {r.naive_full_s:.0f} (linear extrapolation; ~{r.naive_predicted_s:.0f} "
                     "at this size's cost per command)")
        lines.append(
            f"| {r.endpoints:,} | {r.rules:,} | {r.add_compile_ms:.1f} | {r.add_writer_ms:.1f} "
            f"| {total:.1f} | {r.add_naive_ms:.0f} ({r.add_naive_commands}) "
            f"| {r.add_naive_ms / r.add_writer_ms:.1f} | {r.cold_s:.2f} | {r.warm_s:.2f} "
            f"| {naive} ({r.naive_full_commands:,}) "
            f"| {'>= ' if r.naive_extrapolated else ''}{r.naive_full_s / r.cold_s:.0f} |"
        )
    return "\n".join(lines)


def details(results: list[Result]) -> str:
    lines = [
        "| endpoints | rules per endpoint | full compile s | (a) compile without cache ms "
        "| hooks_intact ms |",
        "|---|---|---|---|---|",
    ]
    first = results[0]
    for r in results:
        per = (r.rules - first.rules) / (r.endpoints - first.endpoints) if r is not first else 0
        lines.append(
            f"| {r.endpoints:,} | {per:.1f} | {r.full_compile_s:.2f} "
            f"| {r.add_compile_uncached_ms:.0f} | {r.intact_ms:.0f} |"
            if r is not first else
            f"| {r.endpoints:,} | - | {r.full_compile_s:.2f} "
            f"| {r.add_compile_uncached_ms:.0f} | {r.intact_ms:.0f} |"
        )
    return "\n".join(lines)


def write_section(text: str) -> None:
    content = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(content):
        content = pattern.sub(lambda _: text, content)
    else:
        content = content.rstrip("\n") + "\n\n" + text
    BENCHMARKS.write_text(content.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--additions", type=int, default=7)
    parser.add_argument("--naive-full-max", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--notes", default="", help="a file whose text follows the tables")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, iptables)")
    sizes = sorted(int(size) for size in args.sizes.split(","))
    naive_rate: list[tuple[int, float]] = []
    results = []
    for size in sizes:
        print(f"measuring {size} endpoints ...", file=sys.stderr, flush=True)
        results.append(measure(size, args.additions, args.naive_full_max, naive_rate))
    iptables = subprocess.run(["iptables", "--version"], capture_output=True,
                              text=True).stdout.strip()
    heading = (
        f"{datetime.date.today()}, {iptables}, kernel {os.uname().release}, "
        f"{os.cpu_count()} CPUs; 50 profiles, {NETWORKS} networks; "
        f"(a) median of {args.additions} additions"
    )
    print(heading)
    print(table(results))
    print()
    print(details(results))
    if not args.no_write:
        notes = Path(args.notes).read_text() if args.notes else ""
        write_section(f"{SECTION}\n\n{heading}:\n\n{table(results)}\n\n{details(results)}\n"
                      f"\n{NOTES}" + (f"\n{notes.strip()}\n" if notes else ""))


if __name__ == "__main__":
    main()
