"""The agent's policy path with a real SQLite datastore, a stateful fake kernel for
routes and a recording writer standing in for the kernel's policy: watch events
update the model in memory; the periodic resync rebuilds it from a full read."""

from __future__ import annotations

from pathlib import Path

from datastore.base import ROOT, dumps
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


def _members(policy: CompiledPolicy | None, profiles: list[str]) -> set[str]:
    assert policy is not None
    found = policy.v4.ipsets.get(endpoint_set_name(profiles, 4))
    return set(found.members) if found is not None else set()


def test_events_reach_the_kernel_and_a_resync_repairs_a_missed_one(tmp_path: Path) -> None:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    IpamService(store, "h1").add_pool("10.1.0.0/16", nat_outgoing=True)
    kernel = FakeKernel()
    writer = KernelPolicy()
    names: dict[str, str] = {}  # the Docker API's answers: none yet
    agent = Agent(Settings(hostname="h1"), store, writer=writer,
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
