"""ProfileStore on a real SQLite datastore: records, validation, CAS retries, concurrency."""

from __future__ import annotations

import threading

import pytest

from datastore.base import ROOT, RevisionConflict, dumps
from datastore.errors import Conflict, InvalidRequest, NotFound, Unavailable
from datastore.sqlite import SqliteDatastore
from profiles.model import Profile, Rule
from profiles.store import PROFILES, ProfileStore, profile_key


@pytest.fixture
def store(tmp_path):
    db = SqliteDatastore(str(tmp_path / "profiles.db"))
    yield db
    db.close()


@pytest.fixture
def profiles(store):
    return ProfileStore(store)


@pytest.fixture
def web(profiles):
    return profiles.create(Profile.network_default("web"))


def snapshot(store):
    return [(e.key, e.value, e.revision) for e in store.list(ROOT)]


def stored(store, name):
    entry = store.get(profile_key(name))
    return None if entry is None else entry.data


# ---------------------------------------------------------------- reads / create


def test_create_stores_to_dict_json_under_profiles_prefix(profiles, store):
    profile = Profile("db", ["db", "backend"], [Rule("allow", src_tag="web")], [Rule("allow")])
    created = profiles.create(profile)
    assert created == profile
    assert profile_key("db") == ROOT + "profiles/db"
    entry = store.get(ROOT + "profiles/db")
    assert entry.value == dumps(profile.to_dict())
    assert profiles.get("db") == profile


def test_list_is_sorted_by_name(profiles):
    for name in ("zeta", "alpha", "Mid", "beta"):
        profiles.create(Profile(name))
    assert [p.name for p in profiles.list()] == ["Mid", "alpha", "beta", "zeta"]


def test_list_of_an_empty_store_is_empty(profiles):
    assert profiles.list() == []


def test_profiles_are_stored_in_normal_form(profiles, store):
    profiles.create(Profile("n", inbound_rules=[
        Rule("allow", protocol=6, src_net="10.1.2.3/8", dst_ports=["80"]),
    ]))
    assert stored(store, "n")["rules"]["inbound"] == [
        {"action": "allow", "protocol": "tcp", "src_net": "10.0.0.0/8", "dst_ports": [80]}
    ]


def test_get_unknown_names_it(profiles):
    with pytest.raises(NotFound, match="profile 'ghost' does not exist"):
        profiles.get("ghost")


def test_get_bad_name_is_invalid(profiles):
    with pytest.raises(InvalidRequest, match="illegal characters"):
        profiles.get("no/slash")


def test_create_existing_is_conflict_and_keeps_the_old_one(profiles, store, web):
    before = snapshot(store)
    with pytest.raises(Conflict, match="profile 'web' already exists"):
        profiles.create(Profile("web", ["other"]))
    assert snapshot(store) == before


@pytest.mark.parametrize("profile, message", [
    (Profile("bad name"), "illegal characters"),
    (Profile(""), "must not be empty"),
    (Profile("x" * 129), "longer than 128"),
    (Profile("p", ["ok", "b@d"]), "tags: tag 'b@d' has illegal"),
    (Profile("p", ["t", "t"]), "listed twice"),
    (Profile("p", inbound_rules=[Rule("allow", src_ports=[80])]), "need protocol tcp or udp"),
    (Profile("p", inbound_rules=[Rule("allow", protocol="icmp", icmp_type=255)]), "255"),
    (Profile("p", outbound_rules=[Rule("allow", dst_net="10.0.0.300/8")]), "invalid CIDR"),
    (Profile("p", outbound_rules=["allow"]), "not a Rule"),  # type: ignore[list-item]
])
def test_create_invalid_changes_nothing(profiles, store, web, profile, message):
    before = snapshot(store)
    with pytest.raises(InvalidRequest, match=message):
        profiles.create(profile)
    assert snapshot(store) == before


# ------------------------------------------------------------------ ensure / put


def test_ensure_creates_then_returns_the_existing_one_untouched(profiles, store):
    default = Profile.network_default("net1")
    got, created = profiles.ensure(default)
    assert created and got == default
    profiles.add_rule("net1", "inbound", Rule("allow", protocol="tcp", dst_ports=[80]))
    before = snapshot(store)
    got, created = profiles.ensure(Profile.network_default("net1"))
    assert not created
    assert len(got.inbound_rules) == 2  # the user's rule is kept
    assert snapshot(store) == before


def test_ensure_validates(profiles, store):
    with pytest.raises(InvalidRequest):
        profiles.ensure(Profile("bad name"))
    assert snapshot(store) == []


def test_put_creates_updates_and_reports_unchanged(profiles, store):
    profile = Profile("p", ["a"], [Rule("allow")])
    assert profiles.put(profile) == "created"
    revision = store.get(profile_key("p")).revision
    assert profiles.put(Profile("p", ["a"], [Rule("allow")])) == "unchanged"
    assert store.get(profile_key("p")).revision == revision
    assert profiles.put(Profile("p", ["b"])) == "updated"
    assert profiles.get("p") == Profile("p", ["b"])


def test_put_invalid_changes_nothing(profiles, store, web):
    before = snapshot(store)
    with pytest.raises(InvalidRequest):
        profiles.put(Profile("web", ["bad tag"]))
    assert snapshot(store) == before


# ------------------------------------------------------------------------ remove


def test_remove(profiles, store, web):
    profiles.remove("web")
    assert store.list(PROFILES) == []
    with pytest.raises(NotFound, match="'web'"):
        profiles.remove("web")


# -------------------------------------------------------------------------- tags


def test_add_and_remove_tags(profiles, web):
    assert profiles.add_tag("web", "frontend").tags == ["web", "frontend"]
    assert profiles.get("web").tags == ["web", "frontend"]
    assert profiles.remove_tag("web", "web").tags == ["frontend"]
    assert profiles.get("web").tags == ["frontend"]


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p.add_tag("web", "web"), Conflict, "already has tag 'web'"),
    (lambda p: p.add_tag("web", "a b"), InvalidRequest, "illegal characters"),
    (lambda p: p.add_tag("web", ""), InvalidRequest, "empty"),
    (lambda p: p.remove_tag("web", "nope"), NotFound, "has no tag 'nope'"),
    (lambda p: p.add_tag("ghost", "t"), NotFound, "'ghost' does not exist"),
    (lambda p: p.remove_tag("ghost", "t"), NotFound, "'ghost' does not exist"),
    (lambda p: p.add_tag("bad name", "t"), InvalidRequest, "illegal characters"),
])
def test_refused_tag_changes_change_nothing(profiles, store, web, call, error, message):
    before = snapshot(store)
    with pytest.raises(error, match=message):
        call(profiles)
    assert snapshot(store) == before


# ------------------------------------------------------------------------- rules


R1 = Rule("allow", protocol="tcp", dst_ports=[80])
R2 = Rule("deny", protocol="udp")
R3 = Rule("allow", protocol="icmp", icmp_type=8)


def test_add_rule_appends_and_inserts_at_1_based_positions(profiles, web):
    profiles.add_rule("web", "outbound", R1)
    profiles.add_rule("web", "outbound", R2, position=1)
    profiles.add_rule("web", "outbound", R3, position=4)  # len + 1: the end
    assert profiles.get("web").outbound_rules == [R2, Rule("allow"), R1, R3]
    profiles.add_rule("web", "inbound", R3, position=2)
    assert profiles.get("web").inbound_rules == [Rule("allow", src_tag="web"), R3]


def test_add_rule_normalizes(profiles, web):
    profiles.add_rule("web", "inbound", Rule("allow", protocol="TCP", dst_net="10.9.8.7/16",
                                             dst_ports=["443", "8000:8080"]))
    assert profiles.get("web").inbound_rules[-1] == Rule(
        "allow", protocol="tcp", dst_net="10.9.0.0/16", dst_ports=[443, "8000:8080"])


def test_remove_rule_is_1_based_and_returns_the_rule(profiles, web):
    profiles.add_rule("web", "outbound", R1)
    profiles.add_rule("web", "outbound", R2)
    assert profiles.remove_rule("web", "outbound", 2) == R1
    assert profiles.get("web").outbound_rules == [Rule("allow"), R2]
    assert profiles.remove_rule("web", "inbound", 1) == Rule("allow", src_tag="web")
    assert profiles.get("web").inbound_rules == []


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p.add_rule("web", "sideways", R1), InvalidRequest, "direction 'sideways'"),
    (lambda p: p.add_rule("web", "inbound", R1, 0), InvalidRequest, "numbered from 1"),
    (lambda p: p.add_rule("web", "inbound", R1, -1), InvalidRequest, "numbered from 1"),
    (lambda p: p.add_rule("web", "inbound", R1, 3), InvalidRequest, "can go at 1 to 2"),
    (lambda p: p.add_rule("web", "inbound", R1, True), InvalidRequest, "not a rule number"),
    (lambda p: p.add_rule("web", "inbound", Rule("allow", dst_ports=[1])), InvalidRequest,
     "tcp or udp"),
    (lambda p: p.add_rule("web", "inbound", Rule("maybe")), InvalidRequest, "allow, deny"),
    (lambda p: p.add_rule("web", "inbound", "allow"), InvalidRequest, "not a rule"),
    (lambda p: p.add_rule("ghost", "inbound", R1), NotFound, "'ghost'"),
    (lambda p: p.remove_rule("web", "inbound", 0), InvalidRequest, "numbered from 1"),
    (lambda p: p.remove_rule("web", "inbound", 2), NotFound, "no inbound rule 2 .it has 1"),
    (lambda p: p.remove_rule("web", "up", 1), InvalidRequest, "direction"),
    (lambda p: p.remove_rule("ghost", "inbound", 1), NotFound, "'ghost'"),
    (lambda p: p.replace_rules("web", [R1, Rule("allow", icmp_type=3)], []), InvalidRequest,
     "inbound rule 2: icmp_type"),
    (lambda p: p.replace_rules("ghost", [], []), NotFound, "'ghost'"),
])
def test_refused_rule_changes_change_nothing(profiles, store, web, call, error, message):
    before = snapshot(store)
    with pytest.raises(error, match=message):
        call(profiles)
    assert snapshot(store) == before


def test_replace_rules(profiles, web):
    profile = profiles.replace_rules("web", [R1, R2], [R3])
    assert profile == Profile("web", ["web"], [R1, R2], [R3])
    assert profiles.get("web") == profile
    assert profiles.replace_rules("web", [], []).inbound_rules == []


def test_a_change_that_changes_nothing_writes_nothing(profiles, store, web):
    before = snapshot(store)
    profiles.replace_rules("web", list(web.inbound_rules), list(web.outbound_rules))
    assert snapshot(store) == before


# ------------------------------------------------------- compare-and-swap retries


class InterferingStore(SqliteDatastore):
    """A real SQLite store on which another writer changes the record right before
    each of our next `interferences` updates (so our CAS loses)."""

    def __init__(self, path: str, interferences: int) -> None:
        super().__init__(path)
        self.interferences = interferences
        self.tags_added = 0

    def update(self, key: str, value: str, revision: int):
        if self.interferences > 0:
            self.interferences -= 1
            current = self.get(key)
            data = current.data
            self.tags_added += 1
            data["tags"].append(f"other{self.tags_added}")
            super().update(key, dumps(data), current.revision)
        return super().update(key, value, revision)


def test_a_lost_compare_and_swap_is_retried_and_keeps_the_other_write(tmp_path):
    store = InterferingStore(str(tmp_path / "p.db"), interferences=0)
    profiles = ProfileStore(store)
    profiles.create(Profile.network_default("web"))
    store.interferences = 3
    profiles.add_rule("web", "inbound", R1)
    profile = profiles.get("web")
    assert profile.tags == ["web", "other1", "other2", "other3"]
    assert profile.inbound_rules == [Rule("allow", src_tag="web"), R1]
    store.close()


def test_always_losing_gives_up_with_unavailable(tmp_path):
    store = InterferingStore(str(tmp_path / "p.db"), interferences=0)
    profiles = ProfileStore(store, max_attempts=5)
    profiles.create(Profile.network_default("web"))
    store.interferences = 1000
    with pytest.raises(Unavailable, match="after 5 attempts"):
        profiles.add_rule("web", "inbound", R1)
    assert profiles.get("web").inbound_rules == [Rule("allow", src_tag="web")]
    store.close()


def test_a_profile_deleted_during_a_change_is_not_found(tmp_path):
    class DeletingStore(SqliteDatastore):
        def update(self, key: str, value: str, revision: int):
            self.delete(key)
            raise RevisionConflict(key)

    store = DeletingStore(str(tmp_path / "p.db"))
    profiles = ProfileStore(store)
    profiles.create(Profile("web"))
    with pytest.raises(NotFound, match="'web'"):
        profiles.add_tag("web", "t")
    assert store.list(PROFILES) == []
    store.close()


def test_concurrent_rule_additions_lose_none(tmp_path):
    path = str(tmp_path / "p.db")
    setup = SqliteDatastore(path)
    ProfileStore(setup).create(Profile("busy"))
    setup.close()
    threads_count, per_thread = 8, 12
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        store = SqliteDatastore(path)  # one store per thread, as separate processes would
        profiles = ProfileStore(store)
        try:
            barrier.wait(timeout=30)
            for i in range(per_thread):
                rule = Rule("allow", protocol="tcp", dst_ports=[1000 * number + i])
                profiles.add_rule("busy", "inbound" if i % 2 else "outbound", rule)
                profiles.add_tag("busy", f"t{number}-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    check = SqliteDatastore(path)
    profile = ProfileStore(check).get("busy")
    check.close()
    ports = sorted(r.dst_ports[0] for r in profile.inbound_rules + profile.outbound_rules)
    assert ports == sorted(1000 * n + i for n in range(threads_count) for i in range(per_thread))
    assert len(profile.tags) == threads_count * per_thread
    # Each thread's rules keep their relative order within a direction.
    for number in range(threads_count):
        mine = [r.dst_ports[0] for r in profile.inbound_rules if r.dst_ports[0] // 1000 == number]
        assert mine == sorted(mine)
