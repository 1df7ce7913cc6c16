"""The NetworkDriver half of the libnetwork remote API, as a Flask blueprint.

The app parses every body into flask.g.body; handlers pick the fields,
call NetworkService, and answer JSON. Errors are the project's exceptions.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify
from flask.typing import ResponseReturnValue

from datastore.errors import InvalidRequest
from driver.service import NetworkService

network_blueprint = Blueprint("network", __name__)


def _service() -> NetworkService:
    return current_app.extensions["calico_cnm.network"]


def _string(name: str) -> str:
    value = g.body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"request is missing {name}")
    return value


def _object(name: str) -> dict[str, Any]:
    value = g.body.get(name) or {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object")
    return value


def _list(name: str) -> list[dict[str, Any]]:
    value = g.body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidRequest(f"{name} must be a list of objects")
    return value


@network_blueprint.post("/NetworkDriver.GetCapabilities")
def get_capabilities() -> ResponseReturnValue:
    # Local scope: each host creates its networks; the datastore is the shared truth.
    return jsonify({"Scope": "local", "ConnectivityScope": "global"})


@network_blueprint.post("/NetworkDriver.CreateNetwork")
def create_network() -> ResponseReturnValue:
    _service().create_network(
        _string("NetworkID"), _object("Options"), _list("IPv4Data"), _list("IPv6Data")
    )
    return jsonify({})


@network_blueprint.post("/NetworkDriver.DeleteNetwork")
def delete_network() -> ResponseReturnValue:
    _service().delete_network(_string("NetworkID"))
    return jsonify({})


@network_blueprint.post("/NetworkDriver.CreateEndpoint")
def create_endpoint() -> ResponseReturnValue:
    interface = _service().create_endpoint(
        _string("NetworkID"), _string("EndpointID"), _object("Interface"), _object("Options")
    )
    return jsonify({"Interface": interface})


@network_blueprint.post("/NetworkDriver.DeleteEndpoint")
def delete_endpoint() -> ResponseReturnValue:
    _service().delete_endpoint(_string("NetworkID"), _string("EndpointID"))
    return jsonify({})


@network_blueprint.post("/NetworkDriver.EndpointOperInfo")
def endpoint_oper_info() -> ResponseReturnValue:
    value = _service().endpoint_info(_string("NetworkID"), _string("EndpointID"))
    return jsonify({"Value": value})


@network_blueprint.post("/NetworkDriver.Join")
def join() -> ResponseReturnValue:
    reply = _service().join(
        _string("NetworkID"), _string("EndpointID"), g.body.get("SandboxKey") or "",
        _object("Options"),
    )
    return jsonify(reply)


@network_blueprint.post("/NetworkDriver.Leave")
def leave() -> ResponseReturnValue:
    _service().leave(_string("NetworkID"), _string("EndpointID"))
    return jsonify({})


@network_blueprint.post("/NetworkDriver.ProgramExternalConnectivity")
def program_external_connectivity() -> ResponseReturnValue:
    _service().program_external_connectivity(
        _string("NetworkID"), _string("EndpointID"), _object("Options")
    )
    return jsonify({})


@network_blueprint.post("/NetworkDriver.RevokeExternalConnectivity")
def revoke_external_connectivity() -> ResponseReturnValue:
    _service().revoke_external_connectivity(_string("NetworkID"), _string("EndpointID"))
    return jsonify({})


@network_blueprint.post("/NetworkDriver.DiscoverNew")
@network_blueprint.post("/NetworkDriver.DiscoverDelete")
def discover() -> ResponseReturnValue:
    # Node discovery comes from the datastore, not from Docker.
    return jsonify({})


@network_blueprint.post("/NetworkDriver.AllocateNetwork")
@network_blueprint.post("/NetworkDriver.FreeNetwork")
def swarm_allocation() -> ResponseReturnValue:
    raise InvalidRequest("calico networks have local scope; swarm allocation is not supported")
