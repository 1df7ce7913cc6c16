"""The profile CLI, `apply -f` and `get`, end to end over a real SQLite datastore.

Commands run through plugin.cli.main once it registers the profile commands (it then
imports profile_argv); until then through the same steps built here from the module's
own add_profile_commands/profile_argv. Every test checks the output and the datastore.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence

import pytest
import yaml

from datastore.base import ROOT, dumps
from datastore.errors import CalicoCnmError
from datastore.sqlite import SqliteDatastore
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key
from ipam_driver.service import IpamService
from plugin import cli
from plugin import settings as settings_module
from plugin.compose import open_datastore
from plugin.profile_cli import NAME_CHOICE, add_profile_commands, profile_argv
from profiles.model import Profile, Rule
from profiles.store import ProfileStore, profile_key


def _standalone_main(argv: Sequence[str]) -> int:
    """plugin.cli.main's steps with only the commands of plugin.profile_cli."""
    common = argparse.ArgumentParser(add_help=False)
    settings_module.add_arguments(common)
    parser = argparse.ArgumentParser(prog="calico-cnm")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_profile_commands(commands, common)
    args = parser.parse_args(profile_argv(argv))
    try:
        settings = cli._settings_from(args)
        store = open_datastore(settings)
        try:
            return args.handler(settings, store, args)
        finally:
            store.close()
    except CalicoCnmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str]) -> int:
    if hasattr(cli, "profile_argv"):  # wired into plugin.cli
        return cli.main(list(argv))
    return _standalone_main(argv)


class Cli:
    def __init__(self, tmp_path, capsys, monkeypatch) -> None:
        self.path = str(tmp_path / "state.db")
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.store = SqliteDatastore(self.path)
        self.tmp_path = tmp_path

    def __call__(self, *words: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        code = main([*words, "--sqlite-path", self.path, "--hostname", "host-a"])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *words: str, stdin: str | None = None) -> str:
        code, out, err = self(*words, stdin=stdin)
        assert code == 0, err
        return out

    def fails(self, *words: str, stdin: str | None = None) -> str:
        """Runs a command that must be refused: exit 1, `error: ...`, nothing changed."""
        before = self.snapshot()
        code, out, err = self(*words, stdin=stdin)
        assert code == 1, (out, err)
        assert err.startswith("error: "), err
        assert self.snapshot() == before
        return err

    def snapshot(self) -> list[tuple[str, str, int]]:
        return [(e.key, e.value, e.revision) for e in self.store.list(ROOT)]

    def profile(self, name: str) -> Profile:
        return ProfileStore(self.store).get(name)

    def file(self, name: str, text: str) -> str:
        path = self.tmp_path / name
        path.write_text(text)
        return str(path)


@pytest.fixture
def run(tmp_path, capsys, monkeypatch):
    runner = Cli(tmp_path, capsys, monkeypatch)
    yield runner
    runner.store.close()


@pytest.fixture
def web(run):
    run.ok("profile", "add", "web")
    return run


# ----------------------------------------------------------------- profile_argv


@pytest.mark.parametrize("argv, expected", [
    (["profile", "web", "tag", "show"], ["profile", NAME_CHOICE, "web", "tag", "show"]),
    (["profile", "add", "web"], ["profile", "add", "web"]),
    (["profile", "show"], ["profile", "show"]),
    (["profile", "show", "web", "-o", "json"], ["profile", "show", "web", "-o", "json"]),
    (["profile", "show", "tag"], ["profile", "show", "tag"]),
    (["profile", "show", "rule", "show"], ["profile", NAME_CHOICE, "show", "rule", "show"]),
    (["profile", "add", "tag", "--hostname", "h"], ["profile", "add", "tag", "--hostname", "h"]),
    (["profile", "-h"], ["profile", "-h"]),
    (["profile"], ["profile"]),
    (["pool", "show"], ["pool", "show"]),
    (["profile", "NAME", "rule", "show"], ["profile", NAME_CHOICE, "NAME", "rule", "show"]),
])
def test_profile_argv(argv, expected):
    assert profile_argv(argv) == expected


# ----------------------------------------------------------- add / remove / show


def test_profile_add_creates_the_network_default_profile(run):
    out = run.ok("profile", "add", "web")
    assert "created profile web" in out
    assert run.profile("web") == Profile.network_default("web")
    assert run.store.get(ROOT + "profiles/web").data == Profile.network_default("web").to_dict()


def test_profile_show_table_json_yaml(web):
    web.ok("profile", "add", "db")
    web.ok("profile", "db", "tag", "add", "backend")
    lines = web.ok("profile", "show").splitlines()
    assert lines[0].split() == ["NAME", "TAGS", "INBOUND", "RULES", "OUTBOUND", "RULES"]
    assert lines[1].split() == ["db", "db,backend", "1", "1"]
    assert lines[2].split() == ["web", "web", "1", "1"]
    assert web.ok("profile", "show", "web").splitlines()[1].split() == ["web", "web", "1", "1"]
    documents = json.loads(web.ok("profile", "show", "-o", "json"))
    assert [d["name"] for d in documents] == ["db", "web"]
    assert documents[1] == {"kind": "profile", **Profile.network_default("web").to_dict()}
    one = yaml.safe_load(web.ok("profile", "show", "db", "-o", "yaml"))
    assert one == {"kind": "profile", **web.profile("db").to_dict()}


def test_profile_show_of_nothing_is_just_the_header(run):
    assert run.ok("profile", "show").split() == ["NAME", "TAGS", "INBOUND", "RULES",
                                                 "OUTBOUND", "RULES"]
    assert json.loads(run.ok("profile", "show", "-o", "json")) == []


def test_profile_add_refusals(web):
    assert "profile 'web' already exists" in web.fails("profile", "add", "web")
    err = web.fails("profile", "add", "bad/name")
    assert "'bad/name' has illegal characters" in err
    for word in ("add", "remove", "show"):
        err = web.fails("profile", "add", word)
        assert f"'{word}' cannot be a profile name" in err


def test_profile_show_and_remove_unknown(web):
    assert "profile 'ghost' does not exist" in web.fails("profile", "show", "ghost")
    assert "profile 'ghost' does not exist" in web.fails("profile", "remove", "ghost")


def test_profile_remove(web):
    assert "removed profile web" in web.ok("profile", "remove", "web")
    assert web.store.get(profile_key("web")) is None


def _network(run, network_id: str, profiles: list[str], name: str = "") -> None:
    record = NetworkRecord(id=network_id, ipv4=Subnet("10.210.0.0/24", "10.210.0.1"),
                           ipv6=None, profiles=profiles)
    if hasattr(record, "name"):
        record.name = name
    run.store.put_json(network_key(network_id), record.to_dict())


def _endpoint(run, endpoint_id: str, network_id: str, profiles: list[str]) -> None:
    record = EndpointRecord(id=endpoint_id, network_id=network_id, hostname="host-b",
                            ipv4="10.210.0.5/24", ipv6=None, profiles=profiles)
    run.store.put_json(endpoint_key("host-b", endpoint_id), record.to_dict())


def test_profile_remove_is_refused_while_an_endpoint_carries_it(web):
    _network(web, "n" * 64, [])
    _endpoint(web, "e" * 64, "n" * 64, ["web"])
    err = web.fails("profile", "remove", "web")
    assert "profile 'web' is in use by endpoint eeeeeeeeeeee" in err
    assert "host host-b" in err


def test_profile_remove_is_refused_while_an_endpoints_network_carries_it(web):
    _network(web, "n" * 64, ["web"], name="webnet")
    _endpoint(web, "e" * 64, "n" * 64, [])
    _endpoint(web, "f" * 64, "n" * 64, [])
    err = web.fails("profile", "remove", "web")
    assert "in use by endpoint eeeeeeeeeeee through its network" in err
    assert "nnnnnnnnnnnn" in err and "and 1 more" in err


def test_profile_remove_with_only_an_idle_network_warns(web):
    _network(web, "n" * 64, ["web"])
    _network(web, "m" * 64, ["other"])
    _endpoint(web, "e" * 64, "m" * 64, ["other"])
    code, out, err = web("profile", "remove", "web")
    assert code == 0 and "removed profile web" in out
    assert "warning: network(s) nnnnnnnnnnnn still list profile web" in err
    assert web.store.get(profile_key("web")) is None


# --------------------------------------------------------------------------- tags


def test_tags(web):
    assert "added tag frontend to profile web" in web.ok("profile", "web", "tag", "add",
                                                         "frontend")
    assert web.ok("profile", "web", "tag", "show") == "web\nfrontend\n"
    web.ok("profile", "web", "tag", "remove", "web")
    assert web.ok("profile", "web", "tag", "show") == "frontend\n"
    assert web.profile("web").tags == ["frontend"]


def test_tag_refusals(web):
    assert "tag 'b@d' has illegal characters" in web.fails("profile", "web", "tag", "add",
                                                           "b@d")
    assert "already has tag 'web'" in web.fails("profile", "web", "tag", "add", "web")
    assert "has no tag 'nope'" in web.fails("profile", "web", "tag", "remove", "nope")
    assert "profile 'ghost' does not exist" in web.fails("profile", "ghost", "tag", "add", "t")
    assert "profile 'ghost' does not exist" in web.fails("profile", "ghost", "tag", "show")
    assert "illegal characters" in web.fails("profile", "a:b", "tag", "show")


# -------------------------------------------------------------------------- rules


RULE_FORMS = [
    ("allow", Rule("allow")),
    ("deny tcp", Rule("deny", protocol="tcp")),
    ("allow 47", Rule("allow", protocol=47)),
    ("allow icmp type 8 code 0", Rule("allow", protocol="icmp", icmp_type=8, icmp_code=0)),
    ("allow icmpv6 type 128", Rule("allow", protocol="icmpv6", icmp_type=128)),
    ("allow tcp from tag web cidr 10.1.2.3/16 ports 1024:65535 to ports 80,443",
     Rule("allow", protocol="tcp", src_tag="web", src_net="10.1.0.0/16",
          src_ports=["1024:65535"], dst_ports=[80, 443])),
    ("deny udp from not tag db not cidr 10.0.0.0/8 not ports 53 to not tag x not cidr "
     "10.2.0.0/16 not ports 1:10",
     Rule("deny", protocol="udp", not_src_tag="db", not_src_net="10.0.0.0/8",
          not_src_ports=[53], not_dst_tag="x", not_dst_net="10.2.0.0/16",
          not_dst_ports=["1:10"])),
    ("allow to cidr fd00::/64 from tag a", Rule("allow", dst_net="fd00::/64", src_tag="a")),
]


@pytest.mark.parametrize("text, rule", RULE_FORMS)
@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_rule_add_every_form(web, text, rule, direction):
    out = web.ok("profile", "web", "rule", "add", direction, *text.split())
    assert f"added {direction} rule 2 to profile web" in out
    profile = web.profile("web")
    rules = profile.inbound_rules if direction == "inbound" else profile.outbound_rules
    assert rules[-1] == rule


def test_rule_add_at_remove_and_show(web):
    web.ok("profile", "web", "rule", "add", "inbound", "--at", "1", "deny", "tcp", "to", "ports",
           "22")
    web.ok("profile", "web", "rule", "add", "inbound", "allow", "icmp", "--at", "3")
    web.ok("profile", "web", "rule", "add", "outbound", "deny", "from", "cidr", "10.0.0.0/8",
           "--at", "2")
    assert web.ok("profile", "web", "rule", "show") == (
        "inbound rules:\n"
        "  1  deny tcp to ports 22\n"
        "  2  allow from tag web\n"
        "  3  allow icmp\n"
        "outbound rules:\n"
        "  1  allow\n"
        "  2  deny from cidr 10.0.0.0/8\n"
    )
    out = web.ok("profile", "web", "rule", "remove", "inbound", "1")
    assert "removed inbound rule 1 from profile web: deny tcp to ports 22" in out
    web.ok("profile", "web", "rule", "remove", "outbound", "1")
    web.ok("profile", "web", "rule", "remove", "outbound", "1")
    assert web.ok("profile", "web", "rule", "show") == (
        "inbound rules:\n"
        "  1  allow from tag web\n"
        "  2  allow icmp\n"
        "outbound rules:\n"
        "  (none: nothing matches)\n"
    )


def test_rule_json_and_update_round_trip(web):
    web.ok("profile", "web", "rule", "add", "inbound", "allow", "tcp", "from", "not", "cidr",
           "10.0.0.0/8", "to", "ports", "20:21,80")
    data = json.loads(web.ok("profile", "web", "rule", "json"))
    assert data == {
        "inbound_rules": [
            {"action": "allow", "src_tag": "web"},
            {"action": "allow", "protocol": "tcp", "dst_ports": ["20:21", 80],
             "!src_net": "10.0.0.0/8"},
        ],
        "outbound_rules": [{"action": "allow"}],
    }
    before = web.snapshot()
    out = web.ok("profile", "web", "rule", "update", stdin=json.dumps(data))
    assert "1 outbound" in out
    assert web.snapshot() == before  # the same rules: nothing written
    data["outbound_rules"] = [{"action": "deny", "protocol": "udp"}, "allow tcp to ports 443"]
    data["inbound_rules"].reverse()
    web.ok("profile", "web", "rule", "update", stdin=json.dumps(data))
    profile = web.profile("web")
    assert profile.outbound_rules == [Rule("deny", protocol="udp"),
                                      Rule("allow", protocol="tcp", dst_ports=[443])]
    assert profile.inbound_rules[1] == Rule("allow", src_tag="web")
    other = json.loads(web.ok("profile", "web", "rule", "json"))
    web.ok("profile", "add", "copy")
    web.ok("profile", "copy", "rule", "update", stdin=json.dumps(other))
    assert web.profile("copy").inbound_rules == profile.inbound_rules


@pytest.mark.parametrize("words, expected", [
    # ports without tcp/udp
    ("allow to ports 80", "ports need protocol tcp or udp at word 3\n  allow to ports 80\n"
                          "           ^^^^^"),
    ("allow icmp from ports 80", "ports need protocol tcp or udp at word 4"),
    # bad CIDR
    ("allow from cidr 10.0.0.300/8", "invalid CIDR '10.0.0.300/8' at word 4\n"
                                     "  allow from cidr 10.0.0.300/8\n"
                                     "                  ^^^^^^^^^^^^"),
    ("deny to cidr nonsense", "invalid CIDR 'nonsense' at word 4"),
    # ICMP type 255
    ("allow icmp type 255", "ICMP type 255 cannot be matched"),
    ("allow icmp type 8 code 256", "ICMP code 256 is out of range"),
    ("allow tcp type 8", "'type' needs protocol icmp or icmpv6 at word 3"),
    # unknown keyword
    ("allow tcp frm tag web", "unknown keyword 'frm' at word 3; expected one of"),
    ("allow from tags web", "unknown keyword 'tags' at word 3"),
    ("permit", "unknown keyword 'permit' at word 1; expected one of: allow, deny"),
    ("allow from", "'from' needs tag, cidr or ports after it"),
    ("allow tcp to ports", "missing value after 'ports'"),
    ("allow from not", "'not' must be followed by tag, cidr or ports"),
    ("allow tcp to ports 70000", "port 70000 is out of range"),
    ("allow tcp to ports 90:80", "runs backwards"),
    ("allow 0", "protocol 0"),
    ("allow icmp from cidr fd00::/64", "cannot carry icmp"),
    # illegal tag characters
    ("allow from tag we$b", "tag 'we$b' has illegal characters"),
])
def test_invalid_rules_are_refused_pointing_at_the_bad_word(web, words, expected):
    err = web.fails("profile", "web", "rule", "add", "inbound", *words.split())
    assert expected in err


def test_rule_add_refusals(web):
    add = ("profile", "web", "rule", "add")
    assert "direction 'in' is not one of inbound, outbound" in web.fails(*add, "in", "allow")
    assert "--at '0' is not a rule number" in web.fails(*add, "inbound", "--at", "0", "allow")
    assert "--at 'x' is not a rule number" in web.fails(*add, "inbound", "--at", "x", "allow")
    assert "--at '-1' is not a rule number" in web.fails(*add, "inbound", "--at=-1", "allow")
    err = web.fails(*add, "inbound", "--at", "3", "allow")
    assert "position 3 is out of range" in err and "1 to 2" in err
    err = web.fails("profile", "ghost", "rule", "add", "inbound", "allow")
    assert "profile 'ghost' does not exist" in err


def test_rule_remove_refusals(web):
    remove = ("profile", "web", "rule", "remove")
    assert "no inbound rule 2 (it has 1)" in web.fails(*remove, "inbound", "2")
    assert "rule number '0' is not a rule number" in web.fails(*remove, "inbound", "0")
    assert "rule number 'one'" in web.fails(*remove, "outbound", "one")
    assert "direction 'both'" in web.fails(*remove, "both", "1")
    assert "profile 'ghost' does not exist" in web.fails("profile", "ghost", "rule", "remove",
                                                         "inbound", "1")


@pytest.mark.parametrize("stdin, expected", [
    ('{"inbound_rules": [', "stdin: invalid JSON: Expecting value at line 1 column 20"),
    ("", "stdin: invalid JSON"),
    ("[]", "expected an object with 'inbound_rules' and 'outbound_rules'"),
    ('{"inbound_rules": []}', "outbound_rules: missing"),
    ('{"inbound_rules": [], "outbound_rules": [], "x": 1}', "unknown key 'x'"),
    ('{"inbound_rules": {}, "outbound_rules": []}', "inbound_rules: must be a list"),
    ('{"inbound_rules": [{"action": "allow", "dst_ports": [80]}], "outbound_rules": []}',
     "inbound_rules[0].dst_ports: ports need protocol tcp or udp"),
    ('{"inbound_rules": [], "outbound_rules": [{"action": "allow", "colour": 1}]}',
     "outbound_rules[0].unknown rule key 'colour'"),
    ('{"inbound_rules": ["allow tcp frm tag a"], "outbound_rules": []}',
     "inbound_rules[0]: unknown keyword 'frm' at word 3"),
    ('{"inbound_rules": [{"action": "allow", "protocol": "icmp", "icmp_type": 255}],'
     ' "outbound_rules": []}', "ICMP type 255"),
    ('{"inbound_rules": [{"action": "allow", "src_tag": "a b"}], "outbound_rules": []}',
     "src_tag: tag 'a b' has illegal characters"),
])
def test_rule_update_refusals(web, stdin, expected):
    assert expected in web.fails("profile", "web", "rule", "update", stdin=stdin)


def test_rule_update_of_unknown_profile(web):
    err = web.fails("profile", "ghost", "rule", "update",
                    stdin='{"inbound_rules": [], "outbound_rules": []}')
    assert "profile 'ghost' does not exist" in err


def test_profiles_named_like_actions_stay_reachable(run):
    # A Docker network called "show" gets a profile called "show".
    ProfileStore(run.store).create(Profile.network_default("show"))
    run.ok("profile", "show", "rule", "add", "outbound", "deny", "udp")
    assert "deny udp" in run.ok("profile", "show", "rule", "show")
    assert run.ok("profile", "show", "tag", "show") == "show\n"
    assert run.ok("profile", "show", "show").splitlines()[1].split()[0] == "show"
    run.ok("profile", "remove", "show")
    assert run.store.get(profile_key("show")) is None


# ----------------------------------------------------------------- usage errors


@pytest.mark.parametrize("words", [
    ["profile"],
    ["profile", "web"],
    ["profile", "web", "tag"],
    ["profile", "web", "tag", "add"],
    ["profile", "web", "colour", "show"],
    ["profile", "web", "rule", "add", "inbound"],
    ["profile", "web", "rule", "remove", "inbound"],
    ["profile", "add"],
    ["profile", "show", "-o", "xml"],
    ["get", "things"],
    ["apply"],
])
def test_usage_errors_exit_2_with_usage(run, capsys, words):
    with pytest.raises(SystemExit) as exc:
        main([*words, "--sqlite-path", run.path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: calico-cnm" in err and "error:" in err
    assert run.snapshot() == []


def test_usage_of_the_name_form_reads_naturally(run, capsys):
    with pytest.raises(SystemExit):
        main(["profile", "web", "tag", "--sqlite-path", run.path])
    assert "usage: calico-cnm profile NAME tag" in capsys.readouterr().err


# -------------------------------------------------------------------- apply / get


DOCUMENTS = """\
- kind: pool
  cidr: 10.210.0.0/16
  nat_outgoing: true
- kind: pool
  cidr: fd00:210::/48
  block_size: 120
  ipip: false
  disabled: true
- kind: profile
  name: web
  tags: [web, frontend]
  rules:
    inbound:
    - {action: allow, src_tag: web}
    - allow tcp from not cidr 10.9.0.0/16 to ports 20:21,80,8000:8080
    - {action: allow, protocol: tcp, dst_ports: [20:21]}
    outbound:
    - action: allow
- kind: profile
  name: db
"""


def test_apply_creates_then_reports_unchanged_then_updates(run):
    path = run.file("docs.yaml", DOCUMENTS)
    out = run.ok("apply", "-f", path)
    assert out.splitlines() == [
        "pool 10.210.0.0/16: created", "pool fd00:210::/48: created",
        "profile web: created", "profile db: created",
    ]
    pools = {p.cidr: p for p in IpamService(run.store, "x").get_pools()}
    assert pools["10.210.0.0/16"].nat_outgoing and pools["10.210.0.0/16"].block_size == 26
    assert pools["fd00:210::/48"].disabled and pools["fd00:210::/48"].block_size == 120
    web = run.profile("web")
    assert web.tags == ["web", "frontend"]
    assert web.inbound_rules[1] == Rule("allow", protocol="tcp", not_src_net="10.9.0.0/16",
                                        dst_ports=["20:21", 80, "8000:8080"])
    assert web.inbound_rules[2].dst_ports == ["20:21"]  # not YAML 1.1's base-60 1221
    assert run.profile("db") == Profile("db")

    before = run.snapshot()
    assert run.ok("apply", "-f", path).splitlines()[2] == "profile web: unchanged"
    assert run.snapshot() == before

    changed = DOCUMENTS.replace("nat_outgoing: true", "ipip: true").replace(
        "[web, frontend]", "[web]")
    out = run.ok("apply", "-f", "-", stdin=changed)
    assert out.splitlines() == [
        "pool 10.210.0.0/16: updated", "pool fd00:210::/48: unchanged",
        "profile web: updated", "profile db: unchanged",
    ]
    pool = IpamService(run.store, "x").get_pool("10.210.0.0/16")
    assert pool.ipip and not pool.nat_outgoing  # a flag left out is false
    assert run.profile("web").tags == ["web"]


def test_apply_accepts_json_and_yaml_streams(run):
    docs = [{"kind": "profile", "name": "a"}, {"kind": "pool", "cidr": "10.7.0.0/16"}]
    run.ok("apply", "-f", run.file("a.json", json.dumps(docs)))
    run.ok("apply", "-f", "-", stdin=json.dumps({"kind": "profile", "name": "b"}))
    run.ok("apply", "-f", "-", stdin="kind: profile\nname: c\n---\n- kind: profile\n  name: d\n")
    assert [p.name for p in ProfileStore(run.store).list()] == ["a", "b", "c", "d"]
    assert "nothing to apply" in run.ok("apply", "-f", "-", stdin="")


def test_get_apply_get_round_trips(run):
    run.ok("apply", "-f", run.file("docs.yaml", DOCUMENTS))
    run.ok("profile", "web", "rule", "add", "outbound", "deny", "icmp", "type", "3", "code",
           "1", "to", "not", "tag", "db")
    for output in ("yaml", "json"):
        pools = run.ok("get", "pools", "-o", output)
        profiles = run.ok("get", "profiles", "-o", output)
        before = run.snapshot()
        out = run.ok("apply", "-f", run.file(f"pools.{output}", pools))
        assert all(line.endswith(": unchanged") for line in out.splitlines())
        out = run.ok("apply", "-f", "-", stdin=profiles)
        assert all(line.endswith(": unchanged") for line in out.splitlines())
        assert run.snapshot() == before
        assert run.ok("get", "pools", "-o", output) == pools
        assert run.ok("get", "profiles", "-o", output) == profiles
    # Into an empty datastore: the same documents come back.
    pools, profiles = run.ok("get", "pools"), run.ok("get", "profiles")
    other = run.tmp_path / "other.db"
    for text in (pools, profiles):
        assert main(["apply", "-f", run.file("x.yaml", text), "--sqlite-path", str(other)]) == 0
    run.capsys.readouterr()
    assert main(["get", "profiles", "--sqlite-path", str(other)]) == 0
    assert run.capsys.readouterr().out == profiles
    assert main(["get", "pools", "--sqlite-path", str(other)]) == 0
    assert run.capsys.readouterr().out == pools


def test_get_output_shapes(run):
    assert yaml.safe_load(run.ok("get", "profiles")) == []
    run.ok("apply", "-f", run.file("docs.yaml", DOCUMENTS))
    pools = json.loads(run.ok("get", "pools", "-o", "json"))
    assert pools[0] == {"kind": "pool", "cidr": "10.210.0.0/16", "block_size": 26,
                        "ipip_mode": "never", "vxlan_mode": "never", "nat_outgoing": True,
                        "disabled": False}
    profiles = yaml.safe_load(run.ok("get", "profiles"))
    assert [p["name"] for p in profiles] == ["db", "web"]
    assert profiles[1]["rules"]["inbound"][1]["!src_net"] == "10.9.0.0/16"


@pytest.mark.parametrize("text, expected", [
    ("- kind: pool\n  cidr: 10.8.0.0/16\n- kind: pol\n  cidr: 10.9.0.0/16\n",
     "document 3: kind: 'pol' is not one of pool, profile"),
    ("- kind: profile\n  name: ok\n- {name: x}\n", "document 3: kind: missing"),
    ("- kind: profile\n  name: ok\n- just a string\n", "document 3: expected an object"),
    ("- kind: pool\n  cidr: 10.8.0.300/16\n",
     "document 2 (pool 10.8.0.300/16): cidr: invalid pool"),
    ("- kind: pool\n  cidr: 10.8.0.1/16\n", "host bits are set"),
    ("- kind: pool\n  cidr: 127.0.0.0/16\n", "document 2 (pool 127.0.0.0/16): cidr:"),
    ("- kind: pool\n  cidr: 10.8.0.0/16\n  block_size: 40\n",
     "document 2 (pool 10.8.0.0/16): block_size: invalid block size /40"),
    ("- kind: pool\n  cidr: 10.8.0.0/16\n  ipip: maybe\n", "ipip: 'maybe' is not true or false"),
    ("- kind: pool\n  cidr: 10.8.0.0/16\n  colour: red\n", "unknown pool key 'colour'"),
    ("- kind: pool\n", "cidr: a pool needs a cidr"),
    ("- kind: pool\n  cidr: 10.8.0.0/16\n- kind: pool\n  cidr: 10.8.128.0/17\n",
     "document 3 (pool 10.8.128.0/17): cidr: overlaps pool 10.8.0.0/16 of document 2"),
    ("- kind: profile\n  name: a\n- kind: profile\n  name: a\n",
     "document 3 (profile a): name: profile a is also given in document 2"),
    ("- kind: profile\n  name: web\n  rules:\n    inbound:\n    - {action: allow, "
     "dst_ports: [80]}\n",
     "document 2 (profile web): rules.inbound[0].dst_ports: ports need protocol tcp or udp"),
    ("- kind: profile\n  name: web\n  rules:\n    outbound:\n    - allow tcp frm tag x\n",
     "document 2 (profile web): rules.outbound[0]: unknown keyword 'frm' at word 3"),
    ("- kind: profile\n  name: web\n  rules:\n    inbound:\n    - {action: allow, "
     "src_net: 10.0.0.0/33}\n", "rules.inbound[0].src_net: invalid CIDR"),
    ("- kind: profile\n  name: web\n  rules:\n    inbound:\n    - {action: allow, protocol: "
     "icmp, icmp_type: 255}\n", "ICMP type 255"),
    ("- kind: profile\n  name: web\n  tags: [ok, 'n o']\n", "tags: tag 'n o' has illegal"),
    ("- kind: profile\n  name: show\n", "name: 'show' cannot be a profile name"),
    ("- kind: profile\n  name: web\n  rules: {sideways: []}\n", "unknown direction 'sideways'"),
    ("- kind: profile\n  name: web\n  rules:\n    inbound:\n    - !src_tag: x\n",
     "quote keys that start with '!'"),
    ("- kind: profile\n  name: [unclosed\n", "invalid YAML: "),
    ('[{"kind": "profile", "name": "a"},, ]', "invalid JSON: Expecting value at line 1"),
])
def test_apply_refuses_a_bad_document_and_applies_nothing(run, text, expected):
    # A valid first document proves that nothing is applied before the bad one is found.
    if not text.startswith("["):
        text = "- kind: profile\n  name: first\n" + text
    assert expected in run.fails("apply", "-f", run.file("bad.yaml", text))
    assert run.snapshot() == []


def test_apply_refusals_against_the_datastore(run):
    run.ok("apply", "-f", run.file("docs.yaml", DOCUMENTS))
    good = "- kind: profile\n  name: newone\n"
    err = run.fails("apply", "-f", "-", stdin=good +
                    "- kind: pool\n  cidr: 10.210.0.0/16\n  block_size: 24\n")
    assert "document 2 (pool 10.210.0.0/16): block_size: the pool has blocks of /26" in err
    err = run.fails("apply", "-f", "-", stdin=good + "- kind: pool\n  cidr: 10.210.5.0/24\n")
    assert "document 2 (pool 10.210.5.0/24): cidr: overlaps existing pool 10.210.0.0/16" in err
    assert "cannot read" in run.fails("apply", "-f", str(run.tmp_path / "missing.yaml"))


def test_apply_may_update_an_existing_profile_with_a_reserved_name(run):
    ProfileStore(run.store).create(Profile.network_default("add"))
    out = run.ok("apply", "-f", "-", stdin="kind: profile\nname: add\ntags: [x]\n")
    assert out == "profile add: updated\n"
    assert run.profile("add").tags == ["x"]


def test_profile_show_yaml_is_accepted_by_apply(web):
    text = web.ok("profile", "show", "-o", "yaml")
    web.ok("profile", "remove", "web")
    assert web.ok("apply", "-f", "-", stdin=text) == "profile web: created\n"
    assert web.profile("web") == Profile.network_default("web")


def test_stored_profile_record_is_the_model_dict(web):
    entry = web.store.get(profile_key("web"))
    assert entry.value == dumps(Profile.network_default("web").to_dict())
