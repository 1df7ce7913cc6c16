"""Generated bodies against every driver method of the real app (real SQLite, the
stateful fake kernel): no 5xx reply but 503 (datastore unavailable), every reply JSON
with the error under the key Docker reads, and a rejected request changes nothing.

Bodies are random JSON, malformed bytes, and dockerd's recorded requests with one
field replaced (so that the checks past the first field are reached too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_properties import JSON
from tests.unit.test_protocol import FIXTURES, NETWORK_ID, Plugin, _network

RECORDED: dict[str, list[dict[str, Any]]] = {}
for line in FIXTURES.read_text().splitlines():
    call = json.loads(line)
    RECORDED.setdefault(call["call"], []).append(call["request"])
METHODS = sorted({*RECORDED, "NetworkDriver.GetCapabilities", "IpamDriver.GetCapabilities",
                  "IpamDriver.GetDefaultAddressSpaces", "NetworkDriver.ProgramExternalConnectivity",
                  "NetworkDriver.RevokeExternalConnectivity", "NetworkDriver.DiscoverNew",
                  "NetworkDriver.AllocateNetwork", "Plugin.Activate",
                  "AuthZPlugin.AuthZReq"})

# Values that look like what the fields hold, to get past type checks.
PLAUSIBLE = st.one_of(JSON, st.sampled_from([
    "", "10.98.0.0/24", "10.98.0.300/24", "fd00::/200", "10.98.0.5", "10.98.0.5/24",
    NETWORK_ID, "n" * 63, "e" * 64, "../../etc", "com.docker.network.gateway",
    {"com.docker.network.generic": {"mtu": "0"}}, {"Address": "10.98.0.9/24"},
    [{"Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}],
]))


@st.composite
def bodies(draw: st.DrawFn, method: str) -> bytes:
    kind = draw(st.sampled_from(["json", "bytes", "recorded"] if method in RECORDED
                                else ["json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    request = dict(draw(st.sampled_from(RECORDED[method])))
    field = draw(st.sampled_from(sorted(request) + ["Extra"]))
    request[field] = draw(PLAUSIBLE)
    return json.dumps(request).encode()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    made = Plugin(Path(tmp_path_factory.mktemp("fuzz")))
    made.ipam.add_pool("10.96.0.0/12")
    made.ipam.add_pool("fd00:98::/48")
    _network(made, "10.98.0.0/24")  # so that recorded IDs and pools exist
    return made


@pytest.mark.parametrize("method", METHODS)
def test_generated_bodies_get_json_errors_and_change_nothing_when_refused(
        plugin: Plugin, method: str) -> None:
    @given(bodies(method))
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    def check(body: bytes) -> None:
        before = plugin.state()
        response = plugin.client.post(f"/{method}", data=body)
        assert response.status_code < 500 or response.status_code == 503, (
            method, body, response.status_code, response.get_data(as_text=True))
        reply = response.get_json(force=True, silent=True)
        assert isinstance(reply, dict), (method, body, response.get_data(as_text=True))
        if response.status_code != 200:
            message = reply.get("Err")
            assert isinstance(message, str) and message, (method, body, reply)
            assert reply.get("Error") == message
            assert plugin.state() == before, (method, body, reply)

    check()
