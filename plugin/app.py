"""The Flask app: both drivers' blueprints, body parsing and the one error handler.
Its parts are built by plugin.compose (which the agent and the CLI use too)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from dataplane.netlink import Netlink
from datastore.base import Datastore, DatastoreError, DatastoreUnavailable
from datastore.errors import CalicoCnmError, InvalidRequest
from driver.authz import authz_blueprint
from driver.http import network_blueprint
from ipam_driver.http import ipam_blueprint
from plugin.compose import build_ipam, build_network_service, open_datastore
from plugin.metrics import MeteredDatastore, metrics_for
from plugin.settings import Settings

log = logging.getLogger(__name__)


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
    metrics = metrics_for(settings)
    store = store or open_datastore(settings)
    if metrics.enabled:
        store = MeteredDatastore(store, metrics)
    ipam = build_ipam(settings, store, serving=True)
    app.extensions["calico_cnm.settings"] = settings
    app.extensions["calico_cnm.plugin_reference"] = settings.plugin_reference
    app.extensions["calico_cnm.store"] = store
    app.extensions["calico_cnm.ipam"] = ipam
    app.extensions["calico_cnm.network"] = build_network_service(
        settings, store, ipam, netlink_factory, name_lookup
    )
    app.register_blueprint(network_blueprint)
    app.register_blueprint(ipam_blueprint)
    app.register_blueprint(authz_blueprint)

    @app.before_request
    def start_clock() -> None:
        g.started = time.monotonic()

    @app.after_request
    def count_request(response: Any) -> Any:
        if metrics.enabled and "started" in g:
            metrics.request(request.path.lstrip("/"), time.monotonic() - g.started,
                            response.status_code < 400)
        return response

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
        # "authz" is used only if dockerd runs with --authorization-plugin (driver.authz).
        return jsonify({"Implements": ["NetworkDriver", "IpamDriver", "authz"]})

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
