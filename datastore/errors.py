"""The project's own error types, raised by services and turned into replies.

They live in the bottom layer so that every package (datastore, ipam_driver,
profiles, driver, plugin) can raise them without importing upward. Each class
carries the HTTP status that the plugin's one error handler answers with; the
message names the problem in words an operator can act on.
"""

from __future__ import annotations


class CalicoCnmError(Exception):
    """Base of every error the plugin reports to Docker or the CLI."""

    status = 500


class InvalidRequest(CalicoCnmError):
    """Malformed input: bad JSON, a missing field, an invalid CIDR or option."""

    status = 400


class NotFound(CalicoCnmError):
    """An unknown network, endpoint, pool, profile or address."""

    status = 404


class Conflict(CalicoCnmError):
    """The request contradicts existing state: overlap, in use, already exists."""

    status = 409


class Exhausted(CalicoCnmError):
    """No free address or subnet is left."""

    status = 507


class Unavailable(CalicoCnmError):
    """A dependency (datastore, kernel) failed; retrying may succeed."""

    status = 503


class KernelFeatureMissing(Unavailable):
    """The kernel lacks a feature the request needs (a tunnel type, a link kind)."""
