"""The authorization-plugin API: `docker network rm` of a calico network in use on any
host is refused before it reaches the driver; every other request is allowed. Two apps
with their own hostnames share one datastore, as two hosts share etcd."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from datastore.base import ROOT, DatastoreUnavailable
from datastore.sqlite import SqliteDatastore
from driver.authz import network_removed_by, plugin_disabled_by
from tests.unit.test_cluster_networks import Host

WEB_H1 = "a1" * 32
WEB_H2 = "b2" * 32


def _ask(host: Host, method: str, uri: str, body: bytes = b"") -> dict[str, Any]:
    request: dict[str, Any] = {"User": "", "RequestMethod": method, "RequestUri": uri,
                               "RequestHeaders": {"Content-Type": "application/json"}}
    if body:
        request["RequestBody"] = base64.b64encode(body).decode()
    return host.call("AuthZPlugin.AuthZReq", request)


@pytest.fixture
def cluster(tmp_path: Path) -> tuple[Host, Host, SqliteDatastore, str]:
    path = str(tmp_path / "state.db")
    store = SqliteDatastore(path)
    h1, h2 = Host("h1", store, path), Host("h2", store, path)
    h1.app.extensions["calico_cnm.ipam"].add_pool("10.96.0.0/12")
    h1.network(WEB_H1, "web", "10.99.0.0/24")
    h2.network(WEB_H2, "web", "10.99.0.0/24")
    return h1, h2, store, "10.99.0.0/24"  # the pool ID is the subnet


@pytest.mark.parametrize(("method", "uri", "reference"), [
    ("DELETE", "/v1.41/networks/web", "web"),
    ("delete", "/networks/abc123", "abc123"),
    ("DELETE", "/v1.41/networks/my%20net/", "my net"),
    ("DELETE", "/v1.41/networks/web?force=1", "web"),
    ("GET", "/v1.41/networks/web", None),
    ("POST", "/v1.41/networks/web/disconnect", None),
    ("DELETE", "/v1.41/containers/web", None),
    ("DELETE", "/v1.41/networks/web/extra", None),
    (None, "/v1.41/networks/web", None),
    ("DELETE", None, None),
])
def test_only_a_network_removal_names_a_network(method, uri, reference):
    assert network_removed_by(method, uri) == reference


def test_removal_of_a_network_used_on_another_host_is_refused_naming_it(cluster):
    h1, h2, store, pool = cluster
    h2.endpoint(WEB_H2, "e" * 64, pool)
    before = [(e.key, e.value) for e in store.list(ROOT)]
    for reference in ("web", WEB_H1, WEB_H1[:12]):
        reply = _ask(h1, "DELETE", f"/v1.41/networks/{reference}")
        assert reply["Allow"] is False, reference
        assert "'web'" in reply["Msg"] and "h2" in reply["Msg"] and "h1" not in reply["Msg"]
    # Asking changes nothing.
    assert [(e.key, e.value) for e in store.list(ROOT)] == before


def test_removal_is_allowed_once_no_host_uses_it(cluster):
    h1, h2, _, pool = cluster
    h2.endpoint(WEB_H2, "e" * 64, pool)
    h2.call("NetworkDriver.DeleteEndpoint", {"NetworkID": WEB_H2, "EndpointID": "e" * 64})
    assert _ask(h1, "DELETE", "/v1.41/networks/web") == {"Allow": True}
    assert _ask(h2, "DELETE", f"/networks/{WEB_H2}") == {"Allow": True}


def test_other_requests_and_other_networks_are_allowed(cluster):
    h1, h2, _, pool = cluster
    h2.endpoint(WEB_H2, "e" * 64, pool)
    body = json.dumps({"Name": "web", "Driver": "calico"}).encode()
    assert _ask(h1, "POST", "/v1.41/networks/create", body) == {"Allow": True}
    assert _ask(h1, "GET", "/v1.41/containers/json") == {"Allow": True}
    assert _ask(h1, "DELETE", "/v1.41/networks/bridge-net") == {"Allow": True}
    # Another host's network ID is not a network of this host's Docker.
    assert _ask(h1, "DELETE", f"/v1.41/networks/{WEB_H2}") == {"Allow": True}
    # An ID prefix that is not unique among this host's networks names none.
    h1.network("a1" + "f" * 62, "other", "10.99.1.0/24")
    assert _ask(h1, "DELETE", "/v1.41/networks/a1") == {"Allow": True}
    assert h1.call("AuthZPlugin.AuthZRes", {"RequestMethod": "DELETE",
                                            "ResponseStatusCode": 204}) == {"Allow": True}


def test_removal_is_refused_while_the_datastore_does_not_answer(cluster):
    h1, _, store, _ = cluster

    def down(prefix: str) -> list[Any]:
        raise DatastoreUnavailable("connection refused")

    store.list = down  # type: ignore[method-assign]
    try:
        reply = _ask(h1, "DELETE", "/v1.41/networks/web")
        assert reply["Allow"] is False and "connection refused" in reply["Msg"]
        assert _ask(h1, "GET", "/v1.41/networks") == {"Allow": True}
    finally:
        del store.list


@pytest.mark.parametrize(("method", "uri", "name"), [
    ("POST", "/v1.41/plugins/calico/cnm:latest/disable", "calico/cnm:latest"),
    ("POST", "/plugins/calico/cnm/disable?force=0", "calico/cnm"),
    ("POST", "/v1.41/plugins/calico/cnm:latest/disable?force=1", None),
    ("POST", "/v1.41/plugins/calico/cnm:latest/disable?force=true", None),
    ("POST", "/v1.41/plugins/calico/cnm:latest/enable", None),
    ("GET", "/v1.41/plugins/calico/cnm:latest/disable", None),
])
def test_only_a_disable_without_force_names_a_plugin(method, uri, name):
    assert plugin_disabled_by(method, uri) == name


def _managed_host(tmp_path: Path, store: SqliteDatastore, reference: str | None) -> Host:
    host = Host("h1", store, str(tmp_path / "state.db"))
    host.app.extensions["calico_cnm.plugin_reference"] = reference
    return host


def test_disabling_the_managed_plugin_is_refused_while_this_host_has_networks(
        cluster, tmp_path):
    _, h2, store, _ = cluster
    h1 = _managed_host(tmp_path, store, "calico/cnm:latest")
    for name in ("calico/cnm:latest", "calico/cnm"):
        reply = _ask(h1, "POST", f"/v1.41/plugins/{name}/disable")
        assert reply["Allow"] is False
        assert reply["Msg"].startswith("plugin calico/cnm:latest is in use by 1 calico "
                                       "network(s) on this host (web)")
    # With -f, another plugin's name, or once this host has no network: allowed.
    assert _ask(h1, "POST", "/v1.41/plugins/calico/cnm:latest/disable?force=1")["Allow"]
    assert _ask(h1, "POST", "/v1.41/plugins/other/plugin:latest/disable")["Allow"]
    h2.app.extensions["calico_cnm.plugin_reference"] = "calico/cnm:latest"
    assert not _ask(h2, "POST", "/v1.41/plugins/calico/cnm:latest/disable")["Allow"]
    # Removed here while unused, it is removed everywhere: h2's copy is on its way out.
    h1.call("NetworkDriver.DeleteNetwork", {"NetworkID": WEB_H1})
    assert _ask(h1, "POST", "/v1.41/plugins/calico/cnm:latest/disable")["Allow"]
    assert _ask(h2, "POST", "/v1.41/plugins/calico/cnm:latest/disable")["Allow"]


def test_the_legacy_plugin_never_refuses_a_disable(cluster):
    h1, _, _, _ = cluster
    assert _ask(h1, "POST", "/v1.41/plugins/calico/cnm:latest/disable") == {"Allow": True}
