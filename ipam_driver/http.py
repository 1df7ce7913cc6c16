"""The IpamDriver half of the libnetwork remote API, as a Flask blueprint.

dockerd sends no Content-Type and sometimes an empty body; the app's
before_request hook parses the body into flask.g.body (a dict). Errors are
raised as the project's exceptions and answered by the app's one handler,
which sets both "Err" and "Error" (IPAM replies are read from "Error").
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify
from flask.typing import ResponseReturnValue

from datastore.errors import InvalidRequest
from ipam_driver.service import IpamService

LOCAL_ADDRESS_SPACE = "CalicoLocal"
GLOBAL_ADDRESS_SPACE = "CalicoGlobal"

ipam_blueprint = Blueprint("ipam", __name__)


def _service() -> IpamService:
    return current_app.extensions["calico_cnm.ipam"]


def _string(name: str, required: bool = True) -> str:
    value = g.body.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"request is missing {name}")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {type(value).__name__}")
    return value


def _options() -> dict[str, str]:
    options: Any = g.body.get("Options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("Options must be an object")
    return {str(k): str(v) for k, v in options.items()}


@ipam_blueprint.post("/IpamDriver.GetCapabilities")
def get_capabilities() -> ResponseReturnValue:
    return jsonify({"RequiresMACAddress": False, "RequiresRequestReplay": False})


@ipam_blueprint.post("/IpamDriver.GetDefaultAddressSpaces")
def get_default_address_spaces() -> ResponseReturnValue:
    return jsonify({
        "LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE,
        "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE,
    })


@ipam_blueprint.post("/IpamDriver.RequestPool")
def request_pool() -> ResponseReturnValue:
    v6 = g.body.get("V6", False)
    if not isinstance(v6, bool):
        raise InvalidRequest("V6 must be true or false")
    options = _options()
    if options:
        # Kept with the reservation, they would mean nothing and be shown for ever.
        raise InvalidRequest(
            f"unsupported IPAM option {sorted(options)[0]!r}: calico-ipam takes no "
            "--ipam-opt options (supported: none)"
        )
    pool_id, cidr, data = _service().request_pool(
        _string("Pool", required=False) or None,
        _string("SubPool", required=False) or None,
        None,
        v6,
    )
    return jsonify({"PoolID": pool_id, "Pool": cidr, "Data": data})


@ipam_blueprint.post("/IpamDriver.ReleasePool")
def release_pool() -> ResponseReturnValue:
    _service().release_pool(_string("PoolID"))
    return jsonify({})


@ipam_blueprint.post("/IpamDriver.RequestAddress")
def request_address() -> ResponseReturnValue:
    address = _service().request_address(
        _string("PoolID"), _string("Address", required=False) or None, _options()
    )
    return jsonify({"Address": address, "Data": {}})


@ipam_blueprint.post("/IpamDriver.ReleaseAddress")
def release_address() -> ResponseReturnValue:
    _service().release_address(_string("PoolID"), _string("Address"))
    return jsonify({})
