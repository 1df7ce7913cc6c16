"""Docker's authorization-plugin API, used for one thing: refusing `docker network rm`
of a calico network that a container on some host still uses.

dockerd ignores a remote driver's error from DeleteNetwork (it removes the network
anyway), so the only place a removal can be refused is before it reaches the driver.
dockerd consults this only when started with `--authorization-plugin=calico` (opt-in);
then it asks about every API request, so anything else is allowed without a lookup.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

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


@authz_blueprint.post("/AuthZPlugin.AuthZReq")
def authorize_request() -> ResponseReturnValue:
    reference = network_removed_by(g.body.get("RequestMethod"), g.body.get("RequestUri"))
    if reference is None:
        return jsonify({"Allow": True})
    service: NetworkService = current_app.extensions["calico_cnm.network"]
    try:
        refusal = service.removal_refusal(reference)
    except DatastoreError as exc:
        # Removing it now would leave records behind on every host: refuse.
        refusal = (f"calico-cnm cannot tell whether network {reference!r} is in use "
                   f"(datastore: {exc}); retry when the datastore is back")
    if refusal:
        return jsonify({"Allow": False, "Msg": refusal})
    return jsonify({"Allow": True})


@authz_blueprint.post("/AuthZPlugin.AuthZRes")
def authorize_response() -> ResponseReturnValue:
    return jsonify({"Allow": True})
