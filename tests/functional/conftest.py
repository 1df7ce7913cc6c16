"""Fixtures for functional tests (need root): throwaway namespaces, each test its own.

The namespaces are named ``cnmt-<random>-<role>`` and deleted by the ``lab`` fixture's
finalizer, even when the test fails. See helpers.py for the Docker stand-in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from dataplane.netlink import Netlink
from tests.functional.helpers import Dataplane, Lab

# -- fixtures --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("functional tests need root (network namespaces)")
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            pytest.skip(f"functional tests need {tool}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def host(lab: Lab) -> str:
    return lab.netns("host")


@pytest.fixture
def nl(host: str) -> Iterator[Netlink]:
    with Netlink(netns=host) as netlink:
        netlink.enable_forwarding()
        yield netlink


@pytest.fixture
def dataplane(lab: Lab, nl: Netlink, host: str) -> Dataplane:
    if not (shutil.which("busybox") or shutil.which("ping")):
        pytest.skip("needs busybox or ping")
    return Dataplane(lab, nl, host)
