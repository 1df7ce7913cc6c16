"""Settings: flags > environment > defaults, validated with clear messages."""

from __future__ import annotations

import pytest

from datastore.errors import InvalidRequest
from plugin.cli import build_parser
from plugin.settings import Settings, load


def test_defaults() -> None:
    settings = load({}, {})
    assert settings.sqlite_path == "/var/lib/calico-cnm/state.db"
    assert settings.default_pools == ("192.168.0.0/16",)
    assert settings.socket_paths == ("/run/docker/plugins/calico.sock",
                                     "/run/docker/plugins/calico-ipam.sock")
    assert settings.network_prefix_v4 == 24 and settings.network_prefix_v6 == 64
    assert not settings.uses_etcd and settings.run_agent


def test_environment_then_flags_win() -> None:
    env = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379,http://127.0.0.1:2380",
           "CALICO_CNM_NETWORK_PREFIX_V4": "26", "CALICO_CNM_RUN_AGENT": "false"}
    settings = load({}, env)
    assert settings.etcd_endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:2380")
    assert settings.uses_etcd and settings.network_prefix_v4 == 26 and not settings.run_agent
    settings = load({"network_prefix_v4": "28", "etcd_endpoints": "https://10.0.0.1:2379"}, env)
    assert settings.network_prefix_v4 == 28
    assert settings.etcd_endpoints == ("https://10.0.0.1:2379",)


def test_empty_environment_values_mean_unset() -> None:
    assert load({}, {"CALICO_CNM_HOSTNAME": "", "ETCD_ENDPOINTS": ""}) == load({}, {})


def test_no_default_pools() -> None:
    assert load({}, {"CALICO_CNM_DEFAULT_POOLS": "none"}).default_pools == ()


@pytest.mark.parametrize(("env", "word"), [
    ({"ETCD_ENDPOINTS": "127.0.0.1:2379"}, "127.0.0.1:2379"),
    ({"CALICO_CNM_NETWORK_PREFIX_V4": "big"}, "big"),
    ({"CALICO_CNM_NETWORK_PREFIX_V4": "31"}, "IPv4"),
    ({"CALICO_CNM_DEFAULT_POOLS": "10.0.0.0/40"}, "10.0.0.0/40"),
    ({"CALICO_CNM_WORKLOAD_TO_HOST": "maybe"}, "maybe"),
    ({"CALICO_CNM_RUN_AGENT": "perhaps"}, "perhaps"),
    ({"ETCD_CERT_FILE": "/c.pem"}, "etcd-key-file"),
    ({"CALICO_CNM_HOSTNAME": "bad host"}, "bad host"),
])
def test_invalid_settings_name_the_problem(env: dict[str, str], word: str) -> None:
    with pytest.raises(InvalidRequest, match=word):
        load({}, env)


def test_every_setting_is_a_flag() -> None:
    args = build_parser().parse_args(["serve", "--etcd-endpoints", "http://e:2379",
                                      "--resync-interval", "3"])
    assert args.etcd_endpoints == "http://e:2379" and args.resync_interval == "3"
    assert isinstance(load({"resync_interval": args.resync_interval}, {}), Settings)


def test_routing_mode_run_dir_and_an_unset_as_number() -> None:
    settings = load({}, {"CALICO_CNM_ROUTING": "bgp", "CALICO_CNM_RUN_DIR": "/run/x"})
    assert (settings.routing, settings.run_dir, settings.as_number) == ("bgp", "/run/x", None)
    assert load({"as_number": "64601"}, {}).as_number == 64601
    with pytest.raises(InvalidRequest, match="routing 'ospf' is not one of static, bgp"):
        load({}, {"CALICO_CNM_ROUTING": "ospf"})
    with pytest.raises(InvalidRequest, match="not an absolute path"):
        load({"run_dir": "run/x"}, {})


def test_bgp_command_flags_do_not_leak_into_the_settings() -> None:
    # `--as` of `bgp peer add` / `node set` is not the agent's --as-number.
    args = build_parser().parse_args(["bgp", "peer", "add", "10.0.0.1", "--as", "65001"])
    assert args.peer_as == "65001" and args.as_number is None
    args = build_parser().parse_args(["node", "set", "h1", "--as", "default"])
    assert args.node_as == "default" and args.as_number is None
