"""Fixtures of the multi-host suite: one simulated cluster per session (cluster.py)
and a per-test Stack of networks and containers on any of its hosts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multihost.cluster import LOG_DIR, Cluster, ClusterError, Stack, preflight


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    missing = preflight()
    if missing:
        pytest.fail("the multi-host tests need: " + "; ".join(missing), pytrace=False)
    made = Cluster()
    try:
        made.start()
    except ClusterError as exc:
        pytest.fail(f"the simulated cluster did not start (logs in {LOG_DIR}):\n{exc}",
                    pytrace=False)
    try:
        yield made
    finally:
        problems = made.stop()
        if problems:
            pytest.fail("the simulated cluster left things behind: " + "; ".join(problems),
                        pytrace=False)


@pytest.fixture
def stack(cluster: Cluster) -> Iterator[Stack]:
    made = Stack(cluster)
    try:
        yield made
    finally:
        made.cleanup()
