"""Prometheus metrics of the running plugin (`--metrics-address`): scraped before and
after real containers start and stop, the counters of every process (workers and
agent) have moved, and what the datastore holds is reported at scrape."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Plugin, Stack, docker, post_unix, wait_for


def _scrape(plugin: Plugin) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{plugin.env['CALICO_CNM_METRICS_ADDRESS']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_real_containers_and_state_is_read_at_scrape(
        plugin: Plugin, stack: Stack) -> None:
    before = _scrape(plugin)
    network = stack.network()
    first = stack.container(network)
    stack.container(network)
    stack.exec(first, "true")
    docker("rm", "-f", first)
    # An error reply is counted as one.
    post_unix(plugin.sockets[0], "/NetworkDriver.Join", b'{"NetworkID": "nope"}')

    def moved() -> bool:
        after = _scrape(plugin)
        return _value(after, "calico_cnm_resync_seconds_count") > _value(
            before, "calico_cnm_resync_seconds_count")

    assert wait_for(moved, timeout=15)
    after = _scrape(plugin)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    request = "IpamDriver.RequestAddress"
    assert delta("calico_cnm_requests_total", method=request, outcome="ok") >= 2
    assert delta("calico_cnm_request_seconds_count", method=request) >= 2
    assert delta("calico_cnm_requests_total", method="NetworkDriver.Join",
                 outcome="error") >= 1
    assert delta("calico_cnm_ipam_allocations_total") >= 2
    assert delta("calico_cnm_ipam_releases_total") >= 1
    # The agent's process: policy written for the new endpoints.
    assert delta("calico_cnm_policy_programming_seconds_count", kind="update") \
        + delta("calico_cnm_policy_programming_seconds_count", kind="resync") >= 1
    hostname = socket.gethostname()
    assert _value(after, "calico_cnm_endpoints", host=hostname) >= 1
    pools = [key for key in after if key[0] == "calico_cnm_pool_addresses"
             and ("kind", "allocated") in key[1]]
    assert pools and sum(after[k] for k in pools) >= 2
    assert _value(after, "calico_cnm_datastore_up") == 1
