"""Fixtures of the datastore contract suite: one store per backend."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datastore.base import Datastore
from datastore.etcd import EtcdDatastore
from datastore.sqlite import SqliteDatastore
from tests.conftest import EtcdServer


@dataclass
class Backend:
    """How to open (another handle on) the store under test, and compact it."""

    name: str
    open: Callable[[], Datastore]
    compact: Callable[[Datastore, pytest.MonkeyPatch], None]


def _compact_sqlite(store: Datastore, monkeypatch: pytest.MonkeyPatch) -> None:
    # SqliteDatastore trims its change log every 1000 revisions, keeping
    # CHANGELOG_KEEP of them: keep few and write up to the next multiple of 1000.
    monkeypatch.setattr("datastore.sqlite.CHANGELOG_KEEP", 10)
    key = f"/contract-compaction/{uuid.uuid4().hex}"
    while True:
        entry = store.put_json(key, {"filler": True})
        if entry.revision % 1000 == 0:
            break
    store.delete(key)


def _etcd_compactor(endpoints: list[str]) -> Callable[[Datastore, pytest.MonkeyPatch], None]:
    def compact(store: Datastore, monkeypatch: pytest.MonkeyPatch) -> None:
        url = endpoints[0].rstrip("/")
        if not url.startswith("http://"):
            pytest.skip("compacting an etcd over TLS is not supported by this test")
        revision = store.current_revision()
        body = json.dumps({"revision": str(revision), "physical": True}).encode()
        request = urllib.request.Request(
            f"{url}/v3/kv/compaction", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    return compact


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = str(tmp_path / "store.db")
        return Backend("sqlite", lambda: SqliteDatastore(path), _compact_sqlite)
    endpoints: list[str] = request.getfixturevalue("etcd_endpoints")
    return Backend("etcd", lambda: EtcdDatastore(endpoints), _etcd_compactor(endpoints))


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses (etcd is shared by the whole session)."""
    return f"/contract/{uuid.uuid4().hex}/"


@pytest.fixture
def store(backend: Backend, prefix: str) -> Iterator[Datastore]:
    opened = backend.open()
    try:
        yield opened
        for entry in opened.list(prefix):
            opened.delete(entry.key)
    finally:
        opened.close()



@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own, which the test may stop and start again."""
    server = EtcdServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, str]:
    """(ca_cert, cert_file, key_file): a test CA and one certificate for 127.0.0.1
    usable by both the etcd server and its clients."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make test certificates")
    tls = tmp_path / "tls"
    tls.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tls, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=calico-cnm test CA")
    run("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (tls / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
    )
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf")
    return str(tls / "ca.pem"), str(tls / "node.pem"), str(tls / "node.key")


@pytest.fixture
def tls_etcd(tmp_path: Path, tls_files: tuple[str, str, str]) -> Iterator[EtcdServer]:
    """An etcd of this test's own serving https and requiring client certificates."""
    data_dir = tmp_path / "etcd"
    data_dir.mkdir()
    server = EtcdServer(data_dir, tls=tls_files)
    try:
        server.start()
        yield server
    finally:
        server.stop()
