"""The composition root: the only place where adapters are built and wired."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from dataplane.netlink import Netlink
from datastore.base import Datastore, DatastoreError, DatastoreUnavailable
from datastore.errors import CalicoCnmError, InvalidRequest
from driver.http import network_blueprint
from driver.service import NetworkService
from ipam_driver.http import ipam_blueprint
from ipam_driver.service import IpamService
from plugin.docker_names import DockerNames
from plugin.settings import Settings
from routing.mtu import veth_mtu

log = logging.getLogger(__name__)


def open_datastore(settings: Settings) -> Datastore:
    """The configured backend: etcd when endpoints are set, else embedded SQLite."""
    if settings.uses_etcd:
        from datastore.etcd import EtcdDatastore

        return EtcdDatastore(
            list(settings.etcd_endpoints), ca_cert=settings.etcd_ca_cert,
            cert_file=settings.etcd_cert_file, key_file=settings.etcd_key_file,
        )
    from datastore.sqlite import SqliteDatastore

    return SqliteDatastore(settings.sqlite_path)


def build_ipam(settings: Settings, store: Datastore) -> IpamService:
    return IpamService(
        store, settings.hostname,
        network_prefix_v4=settings.network_prefix_v4,
        network_prefix_v6=settings.network_prefix_v6,
    )


def build_network_service(
    settings: Settings,
    store: Datastore,
    ipam: IpamService,
    netlink_factory: Callable[[], Netlink] | None = None,
    name_lookup: Callable[[str], str | None] | None = None,
) -> NetworkService:
    return NetworkService(
        store, ipam, settings.hostname, netlink_factory or Netlink,
        name_lookup or DockerNames(settings.docker_host).network_name,
        mtu_for=lambda subnets: veth_mtu(store, settings.hostname, subnets),
    )


def _error_reply(message: str, status: int) -> ResponseReturnValue:
    # Network replies are read from "Err", IPAM replies from "Error": send both.
    return jsonify({"Err": message, "Error": message}), status


def create_app(
    settings: Settings,
    store: Datastore | None = None,
    netlink_factory: Callable[[], Netlink] | None = None,
    name_lookup: Callable[[str], str | None] | None = None,
) -> Flask:
    app = Flask("calico_cnm")
    store = store or open_datastore(settings)
    ipam = build_ipam(settings, store)
    app.extensions["calico_cnm.settings"] = settings
    app.extensions["calico_cnm.store"] = store
    app.extensions["calico_cnm.ipam"] = ipam
    app.extensions["calico_cnm.network"] = build_network_service(
        settings, store, ipam, netlink_factory, name_lookup
    )
    app.register_blueprint(network_blueprint)
    app.register_blueprint(ipam_blueprint)

    @app.before_request
    def parse_body() -> None:
        # dockerd sends no Content-Type, and some calls have an empty body.
        raw = request.get_data(cache=True)
        if not raw.strip():
            g.body = {}
            return
        try:
            body: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        g.body = body

    @app.post("/Plugin.Activate")
    def activate() -> ResponseReturnValue:
        return jsonify({"Implements": ["NetworkDriver", "IpamDriver"]})

    @app.errorhandler(CalicoCnmError)
    def project_error(exc: CalicoCnmError) -> ResponseReturnValue:
        log.warning("%s %s: %s", request.path, type(exc).__name__, exc)
        return _error_reply(str(exc), exc.status)

    @app.errorhandler(DatastoreUnavailable)
    def datastore_down(exc: DatastoreUnavailable) -> ResponseReturnValue:
        log.error("%s: datastore unavailable: %s", request.path, exc)
        return _error_reply(f"datastore unavailable: {exc}", 503)

    @app.errorhandler(DatastoreError)
    def datastore_error(exc: DatastoreError) -> ResponseReturnValue:
        log.error("%s: datastore error: %s", request.path, exc)
        return _error_reply(f"datastore error: {exc}", 500)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        # 404 tells Docker the method is not implemented.
        return _error_reply(f"{request.path}: {exc.name}", exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("%s failed", request.path)
        return _error_reply(f"internal error in {request.path}: {exc}", 500)

    return app
