"""The agent's policy path with a real SQLite datastore, a stateful fake kernel for
routes and a recording writer standing in for the kernel's policy: watch events
update the model in memory; the periodic resync rebuilds it from a full read."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from datastore.base import ROOT, DatastoreUnavailable, dumps
from datastore.sqlite import SqliteDatastore
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key
from ipam_driver.service import IpamService
from plugin.agent import Agent
from plugin.policy import HostPolicy
from plugin.settings import Settings
from profiles.compiler import CompiledPolicy, endpoint_set_name
from profiles.grammar import parse_rule
from profiles.iptables import ApplyReport, PolicyWriter
from profiles.store import ProfileStore
from tests.unit.fake_docker import FakeDockerNetworks
from tests.unit.fakes import FakeKernel


class KernelPolicy(PolicyWriter):
    """Holds the policy the kernel would hold; remembers how it got there."""

    def __init__(self) -> None:
        super().__init__()
        self.policy: CompiledPolicy | None = None
        self.writes: list[str] = []

    def apply(self, policy: CompiledPolicy) -> ApplyReport:
        self.policy = policy
        self.writes.append("apply")
        return ApplyReport()

    def resync(self, policy: CompiledPolicy) -> ApplyReport:
        self.policy = policy
        self.writes.append("resync")
        return ApplyReport(full=True)


def _no_docker(_network_id: str) -> None:
    """The Docker API does not answer: the agent removes nothing as stale."""
    return None


def _members(policy: CompiledPolicy | None, profiles: list[str]) -> set[str]:
    assert policy is not None
    found = policy.v4.ipsets.get(endpoint_set_name(profiles, 4))
    return set(found.members) if found is not None else set()


def test_events_reach_the_kernel_and_a_resync_repairs_a_missed_one(tmp_path: Path) -> None:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    IpamService(store, "h1").add_pool("10.1.0.0/16", nat_outgoing=True)
    kernel = FakeKernel()
    kernel.add_link("eth0", addresses=["10.0.0.1/24"])
    writer = KernelPolicy()
    names: dict[str, str] = {}  # the Docker API's answers: none yet
    agent = Agent(Settings(hostname="h1"), store, writer=writer,
                  docker_networks=FakeDockerNetworks(), network_state=_no_docker,
                  netlink_factory=kernel.netlink, name_lookup=names.get)

    # A network whose name is not known yet, and a container on it.
    network = NetworkRecord(id="n1", ipv4=Subnet("10.1.0.0/24", "10.1.0.1"), ipv6=None)
    store.create(network_key("n1"), dumps(network.to_dict()))
    endpoint = EndpointRecord(id="a" * 64, network_id="n1", hostname="h1",
                              ipv4="10.1.0.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()))
    revision = store.current_revision()
    agent.resync()
    assert writer.writes == ["resync"]
    assert writer.policy is not None and writer.policy.v4.filter["cali-to-wl-dispatch"] == [
        "-j DROP"]  # no profile yet: fail closed

    def deliver() -> None:
        nonlocal revision
        events = store.watch(ROOT, revision, 0)
        if events:
            revision = events[-1].revision
            agent.handle(events)

    # Docker answers now; the next network event makes the agent resolve the name
    # (it writes the default profile and the network's profiles), and the events of
    # those writes put the container in the profile's set.
    names["n1"] = "web"
    network.mtu = 1400
    store.put_json(network_key("n1"), network.to_dict())
    deliver()
    deliver()
    assert writer.writes[-1] == "apply" and writer.writes.count("resync") == 1
    member = f"10.1.0.5,{endpoint.host_ifname}"
    assert _members(writer.policy, ["web"]) == {member}
    # A second container: one more event, one more member, no full read.
    second = EndpointRecord(id="b" * 64, network_id="n1", hostname="h1",
                            ipv4="10.1.0.6/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", second.id), dumps(second.to_dict()))
    deliver()
    assert _members(writer.policy, ["web"]) == {member, f"10.1.0.6,{second.host_ifname}"}
    # A rule change, through the CLI's store.
    ProfileStore(store).add_rule("web", "inbound", parse_rule("allow tcp to ports 8000"))
    deliver()
    assert writer.policy is not None
    assert "--dports 8000" in writer.policy.v4.filter["cali-pi-web"][-1]
    # A missed event (history lost, or a bug): the periodic resync converges.
    ProfileStore(store).add_rule("web", "inbound", parse_rule("allow udp to ports 53"))
    revision = store.current_revision()
    agent.resync()
    assert writer.writes[-1] == "resync"
    fresh = HostPolicy("h1").load(store).policy()
    assert writer.policy.v4 == fresh.v4 and writer.policy.v6 == fresh.v6
    assert "--dports 53" in writer.policy.v4.filter["cali-pi-web"][-1]


def test_a_network_name_that_cannot_name_a_profile_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    """Docker allows network names (spaces, >128 characters) that are not valid profile
    names: resolving that network fails, but every other network still resolves and
    the resync still programs routes and policy."""
    store = SqliteDatastore(str(tmp_path / "state.db"))
    kernel = FakeKernel()
    kernel.add_link("eth0", addresses=["10.0.0.1/24"])
    writer = KernelPolicy()
    names = {"n1": "my net", "n2": "web"}
    agent = Agent(Settings(hostname="h1"), store, writer=writer,
                  docker_networks=FakeDockerNetworks(), network_state=_no_docker,
                  netlink_factory=kernel.netlink, name_lookup=names.get)
    for network_id, cidr in (("n1", "10.1.0"), ("n2", "10.2.0")):
        network = NetworkRecord(id=network_id, ipv4=Subnet(f"{cidr}.0/24", f"{cidr}.1"),
                                ipv6=None)
        store.create(network_key(network_id), dumps(network.to_dict()))
    endpoint = EndpointRecord(id="a" * 64, network_id="n2", hostname="h1",
                              ipv4="10.2.0.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()))
    with kernel.netlink() as netlink:  # the route is missing: the resync restores it
        netlink.create_veth(endpoint.host_ifname, endpoint.container_ifname)

    agent.resync()

    assert writer.writes == ["resync"]
    assert _members(writer.policy, ["web"]) == {f"10.2.0.5,{endpoint.host_ifname}"}
    assert kernel.routes == {"10.2.0.5": endpoint.host_ifname}
    assert store.get(network_key("n1")).data["profiles"] == []  # fails closed
    assert store.get(f"{ROOT}profiles/my net") is None


class StartingEtcd(SqliteDatastore):
    """A datastore that does not answer for its first calls (etcd still starting)."""

    def __init__(self, path: str, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def current_revision(self) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise DatastoreUnavailable("etcd is not answering yet")
        return super().current_revision()


def test_agent_survives_a_datastore_that_is_down_when_it_starts(tmp_path: Path) -> None:
    """serve forks the agent once and never restarts it: an agent that exits because
    etcd did not answer at start-up leaves the host with no policy at all."""
    store = StartingEtcd(str(tmp_path / "state.db"), failures=1)
    kernel = FakeKernel()
    kernel.add_link("eth0", addresses=["10.0.0.1/24"])
    writer = KernelPolicy()
    agent = Agent(Settings(hostname="h1", resync_interval=60), store, writer=writer,
                  docker_networks=FakeDockerNetworks(),
                  network_state=_no_docker,
                  netlink_factory=kernel.netlink, name_lookup={}.get)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not writer.writes and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.stop()
    thread.join(5)
    assert outcome == [] and writer.writes[:1] == ["resync"]


def test_an_unreadable_network_record_fails_only_its_own_endpoints(tmp_path: Path) -> None:
    """README: "A profile or network record that cannot be read fails only its own
    endpoints closed" -- the resync must still program everything else."""
    store = SqliteDatastore(str(tmp_path / "state.db"))
    kernel = FakeKernel()
    kernel.add_link("eth0", addresses=["10.0.0.1/24"])
    writer = KernelPolicy()
    agent = Agent(Settings(hostname="h1"), store, writer=writer,
                  docker_networks=FakeDockerNetworks(), network_state=_no_docker,
                  netlink_factory=kernel.netlink, name_lookup={"n2": "web"}.get)
    store.create(network_key("n1"), dumps({"written by": "a newer version"}))
    network = NetworkRecord(id="n2", ipv4=Subnet("10.2.0.0/24", "10.2.0.1"), ipv6=None)
    store.create(network_key("n2"), dumps(network.to_dict()))
    endpoint = EndpointRecord(id="a" * 64, network_id="n2", hostname="h1",
                              ipv4="10.2.0.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()))
    # A container of the unreadable network whose host route went missing.
    stranded = EndpointRecord(id="b" * 64, network_id="n1", hostname="h1",
                              ipv4="10.1.0.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", stranded.id), dumps(stranded.to_dict()))
    with kernel.netlink() as netlink:
        netlink.create_veth(stranded.host_ifname, stranded.container_ifname)

    agent.resync()

    assert writer.writes == ["resync"]
    assert _members(writer.policy, ["web"]) == {f"10.2.0.5,{endpoint.host_ifname}"}
    assert kernel.routes == {"10.1.0.5": stranded.host_ifname}
