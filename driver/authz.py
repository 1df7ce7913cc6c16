"""Docker's authorization-plugin API, used for two refusals Docker itself cannot make:

- `docker network rm` of a calico network that a container on some host still uses:
  dockerd ignores a remote driver's error from DeleteNetwork (it removes the network
  anyway), so a removal can only be refused before it reaches the driver;
- `docker plugin disable` (without -f) of this managed plugin while calico networks
  exist on this host: dockerd's own in-use count is lost when dockerd restarts.

dockerd consults this only when started with `--authorization-plugin=NAME` (opt-in);
then it asks about every API request, so anything else is allowed without a lookup.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

from flask import Blueprint, current_app, g, jsonify
from flask.typing import ResponseReturnValue

from datastore.base import DatastoreError
from driver.service import NetworkService

authz_blueprint = Blueprint("authz", __name__)

# DELETE /networks/{id or name}, with or without the API version prefix.
_NETWORK_REMOVAL = re.compile(r"^(?:/v[0-9.]+)?/networks/(?P<reference>[^/]+)/?$")


def network_removed_by(method: object, uri: object) -> str | None:
    """The network reference a Docker API request removes, or None if it removes none."""
    if not isinstance(method, str) or method.upper() != "DELETE" or not isinstance(uri, str):
        return None
    match = _NETWORK_REMOVAL.match(urlsplit(uri).path)
    return unquote(match.group("reference")) if match else None


# POST /plugins/{name}/disable; the CLI does not escape the name's slash.
_PLUGIN_DISABLE = re.compile(r"^(?:/v[0-9.]+)?/plugins/(?P<name>.+)/disable/?$")


def plugin_disabled_by(method: object, uri: object) -> str | None:
    """The plugin name a request disables without force, or None."""
    if not isinstance(method, str) or method.upper() != "POST" or not isinstance(uri, str):
        return None
    parts = urlsplit(uri)
    match = _PLUGIN_DISABLE.match(parts.path)
    if match is None:
        return None
    force = parse_qs(parts.query).get("force", [""])[-1].lower()
    return None if force in ("1", "true") else unquote(match.group("name"))


def _names_this_plugin(name: str, reference: str) -> bool:
    with_tag = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    return with_tag == reference


def _refusal(service: NetworkService, plugin_reference: str | None,
             network: str | None, plugin: str | None) -> str:
    if network is not None:
        return service.removal_refusal(network)
    if plugin is not None and plugin_reference and _names_this_plugin(plugin, plugin_reference):
        return service.disable_refusal(plugin_reference)
    return ""


@authz_blueprint.post("/AuthZPlugin.AuthZReq")
def authorize_request() -> ResponseReturnValue:
    method, uri = g.body.get("RequestMethod"), g.body.get("RequestUri")
    network, plugin = network_removed_by(method, uri), plugin_disabled_by(method, uri)
    if network is None and plugin is None:
        return jsonify({"Allow": True})
    service: NetworkService = current_app.extensions["calico_cnm.network"]
    # The managed plugin's own name (None for the legacy plugin), set by the app.
    reference = current_app.extensions.get("calico_cnm.plugin_reference")
    try:
        refusal = _refusal(service, reference, network, plugin)
    except DatastoreError as exc:
        # Going ahead now could leave records behind on every host: refuse.
        refusal = (f"calico-cnm cannot tell whether {urlsplit(str(uri)).path!r} is "
                   f"safe (datastore: {exc}); retry when the datastore is back")
    if refusal:
        return jsonify({"Allow": False, "Msg": refusal})
    return jsonify({"Allow": True})


@authz_blueprint.post("/AuthZPlugin.AuthZRes")
def authorize_response() -> ResponseReturnValue:
    return jsonify({"Allow": True})
