"""The plugin on etcd v3 instead of SQLite, and a Docker Compose stack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import netaddr

from datastore.etcd import EtcdDatastore
from tests.e2e.conftest import (
    IMAGE,
    Plugin,
    Stack,
    docker,
    host_links,
    host_routes,
    run,
    unique,
    wait_for,
)


def test_plugin_keeps_all_state_in_etcd(stack: Stack, etcd_endpoints: list[str],
                                        tmp_path: Path) -> None:
    # One plugin (and agent) per host: the SQLite one steps aside meanwhile.
    main = stack.plugin
    main.stop()
    env = {
        "ETCD_ENDPOINTS": ",".join(etcd_endpoints),
        "CALICO_CNM_SQLITE_PATH": str(tmp_path / "must-not-exist.db"),
        "CALICO_CNM_DEFAULT_POOLS": "10.208.0.0/16",
        "CALICO_CNM_RESYNC_INTERVAL": "2",
    }
    etcd_plugin = Plugin(env, tmp_path / "plugin.log")
    etcd_plugin.start()
    store = EtcdDatastore(etcd_endpoints)
    try:
        stack.plugin = etcd_plugin
        net = stack.network()
        subnet = stack.inspect_network(net)["IPAM"]["Config"][0]["Subnet"]
        assert netaddr.IPNetwork(subnet) in netaddr.IPNetwork("10.208.0.0/16")
        a = stack.container(net)
        b = stack.container(net)
        stack.exec(a, "ping", "-c", "1", "-W", "2", stack.address(b, net))
        keys = [e.key for e in store.list("/calico-cnm/v1/")]
        network_id = stack.inspect_network(net)["Id"]
        assert f"/calico-cnm/v1/networks/{network_id}" in keys
        assert any(k.startswith("/calico-cnm/v1/endpoints/") for k in keys)
        assert any(k.startswith("/calico-cnm/v1/ipam/blocks/") for k in keys)
        assert not (tmp_path / "must-not-exist.db").exists()
        pools = json.loads(etcd_plugin.cli("pool", "show", "-o", "json").stdout)
        assert [p["pool"]["cidr"] for p in pools] == ["10.208.0.0/16"]
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        assert not [k for k in (e.key for e in store.list("/calico-cnm/v1/"))
                    if k.startswith(("/calico-cnm/v1/endpoints/", "/calico-cnm/v1/networks/"))]
    finally:
        stack.cleanup()
        etcd_plugin.stop()
        store.close()
        stack.plugin = main
        main.start()


COMPOSE_FILE = """
version: "2.4"
services:
  web:
    image: {image}
    command: ["sleep", "600"]
    networks: [app]
  client:
    image: {image}
    command: ["sleep", "600"]
    networks:
      app:
        ipv4_address: 10.210.0.50
networks:
  app:
    driver: calico
    ipam:
      driver: calico-ipam
      config:
        - subnet: 10.210.0.0/24
"""


def test_compose_stack_by_service_name_and_down_leaves_nothing(stack: Stack,
                                                               tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    assert compose, "Debian's docker-compose is installed by scripts/install-deps.sh"
    stack.plugin.cli("pool", "add", "10.210.0.0/24")
    project = unique("cnmcompose")
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE.format(image=IMAGE))
    base = [compose, "-p", project, "-f", str(tmp_path / "docker-compose.yml")]
    links_before = set(host_links())
    try:
        run(*base, "up", "-d", timeout=180)
        client = f"{project}_client_1"
        assert stack.address(client, f"{project}_app") == "10.210.0.50"
        docker("exec", client, "ping", "-c", "1", "-W", "2", "web")
        docker("exec", f"{project}_web_1", "ping", "-c", "1", "-W", "2", "client")
        assert len(set(host_links()) - links_before) == 2
    finally:
        run(*base, "down", timeout=180)
    assert wait_for(lambda: set(host_links()) == links_before, timeout=5)
    assert "10.210.0.50" not in host_routes()
    assert docker("network", "inspect", f"{project}_app", check=False).returncode != 0
    allocations = json.loads(stack.plugin.cli("ipam", "show", "-o", "json").stdout)
    assert [a for a in allocations
            if netaddr.IPAddress(a["address"]) in netaddr.IPNetwork("10.210.0.0/24")] == []
    stack.plugin.cli("pool", "remove", "10.210.0.0/24")
    assert docker("image", "inspect", IMAGE, check=False).returncode == 0
