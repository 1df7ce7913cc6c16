"""Profiles in the datastore: read, create, change and delete them with compare-and-swap.

Each profile is one record, ``ROOT + "profiles/<name>"``, holding
``Profile.to_dict()`` as canonical JSON. Every change is read -> change a copy ->
validate -> ``update`` on the revision that was read; when another writer got there
first the whole step is retried from the read (bounded by ``max_attempts``, with a
short jittered back-off; then :class:`Unavailable`). Nothing is cached, so the CLI,
every gunicorn worker and every host's agent may share one datastore.

Every method validates its arguments (and the resulting profile) before it writes;
a refused call writes nothing. Errors are the project's own:

* :class:`InvalidRequest`: a bad name, tag, direction, position or rule;
* :class:`NotFound`: an unknown profile, a tag it does not have, a rule number past
  its last rule;
* :class:`Conflict`: creating a profile that exists, adding a tag it already has;
* :class:`Unavailable`: the datastore is unreachable or kept changing under us.

Choices:

* ``add_tag`` of a tag the profile already has is refused with Conflict (and
  ``remove_tag`` of a missing tag with NotFound), so the CLI tells the operator that
  nothing changed; declarative, idempotent changes go through :meth:`put`
  (``calico-cnm apply``).
* Rule positions are 1-based, as the CLI prints them (``rule show``).
* Profiles are stored in normal form (``Rule.from_dict(rule.to_dict())``), so that
  equal rules compare equal and a rewrite that changes nothing writes nothing.
* Whether endpoints still use a profile is not checked here (``profiles`` does not
  read driver records); ``calico-cnm profile remove`` checks it first. An endpoint
  whose profile is missing fails closed (its chains drop everything).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterator, Sequence

from datastore.base import (
    ROOT,
    AlreadyExists,
    Datastore,
    Entry,
    RevisionConflict,
    cas_attempts,
    dumps,
    unavailable_as_error,
)
from datastore.errors import CalicoCnmError, Conflict, InvalidRequest, NotFound
from profiles.model import Profile, Rule, check_name

log = logging.getLogger(__name__)

PROFILES = ROOT + "profiles/"
DIRECTIONS = ("inbound", "outbound")



def profile_key(name: str) -> str:
    return PROFILES + name


_store_errors = unavailable_as_error("profile")


def check_direction(direction: object) -> str:
    if direction not in DIRECTIONS:
        raise InvalidRequest(f"direction '{direction}' is not one of inbound, outbound")
    return str(direction)


def _check_number(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{what} {value!r} is not a rule number")
    if value < 1:
        raise InvalidRequest(f"{what} {value} is not a rule number (rules are numbered from 1)")
    return value


def normalized_rule(rule: object) -> Rule:
    """A validated copy of rule in normal form."""
    if not isinstance(rule, Rule):
        raise InvalidRequest(f"not a rule: {rule!r}")
    rule.validate()
    return Rule.from_dict(rule.to_dict())


def normalized_profile(profile: object) -> Profile:
    """A validated copy of profile in normal form."""
    if not isinstance(profile, Profile):
        raise InvalidRequest(f"not a profile: {profile!r}")
    profile.validate()
    return Profile.from_dict(profile.to_dict())


def _rules(profile: Profile, direction: str) -> list[Rule]:
    return profile.inbound_rules if direction == "inbound" else profile.outbound_rules


class ProfileStore:
    """The profiles of one datastore."""

    def __init__(self, store: Datastore, max_attempts: int = 100) -> None:
        self.store = store
        self.max_attempts = max(1, max_attempts)

    # ------------------------------------------------------------------ reads

    @_store_errors
    def list(self) -> builtins.list[Profile]:
        """Every profile, sorted by name."""
        profiles = [self._load(entry) for entry in self.store.list(PROFILES)]
        return sorted(profiles, key=lambda profile: profile.name)

    @_store_errors
    def get(self, name: str) -> Profile:
        """The profile called name; NotFound naming it."""
        return self._load(self._read(check_name(name, "profile name")))

    # ----------------------------------------------------------------- writes

    @_store_errors
    def create(self, profile: Profile) -> Profile:
        """Store a new profile; Conflict if one of that name exists."""
        profile = normalized_profile(profile)
        try:
            self.store.create(profile_key(profile.name), dumps(profile.to_dict()))
        except AlreadyExists:
            raise Conflict(f"profile '{profile.name}' already exists") from None
        return profile

    @_store_errors
    def ensure(self, profile: Profile) -> tuple[Profile, bool]:
        """Create profile if no profile of its name exists, else return the stored one
        untouched. Returns (the stored profile, whether it was created)."""
        profile = normalized_profile(profile)
        key = profile_key(profile.name)
        for _ in self._attempts(f"creating profile {profile.name}"):
            entry = self.store.get(key)
            if entry is not None:
                return self._load(entry), False
            try:
                self.store.create(key, dumps(profile.to_dict()))
            except AlreadyExists:
                continue
            return profile, True
        raise AssertionError("unreachable")

    @_store_errors
    def put(self, profile: Profile) -> str:
        """Create or replace a profile as a whole (``calico-cnm apply``).

        Returns "created", "updated" or "unchanged" (nothing is written then).
        """
        profile = normalized_profile(profile)
        key = profile_key(profile.name)
        text = dumps(profile.to_dict())
        for _ in self._attempts(f"writing profile {profile.name}"):
            entry = self.store.get(key)
            try:
                if entry is None:
                    self.store.create(key, text)
                    return "created"
                if self._load(entry) == profile:
                    return "unchanged"
                self.store.update(key, text, entry.revision)
            except (AlreadyExists, RevisionConflict):
                continue
            return "updated"
        raise AssertionError("unreachable")

    @_store_errors
    def remove(self, name: str) -> None:
        """Delete a profile; NotFound if there is none of that name."""
        key = profile_key(check_name(name, "profile name"))
        if not self.store.delete(key):
            raise self._not_found(name)

    def add_tag(self, name: str, tag: str) -> Profile:
        """Add a tag (at the end); Conflict if the profile already has it."""
        check_name(tag, "tag")

        def change(profile: Profile) -> None:
            if tag in profile.tags:
                raise Conflict(f"profile '{profile.name}' already has tag '{tag}'")
            profile.tags.append(tag)

        return self._modify(name, change, f"adding tag {tag} to profile {name}")

    def remove_tag(self, name: str, tag: str) -> Profile:
        """Remove a tag; NotFound if the profile does not have it."""
        check_name(tag, "tag")

        def change(profile: Profile) -> None:
            if tag not in profile.tags:
                have = ", ".join(profile.tags) or "none"
                raise NotFound(
                    f"profile '{profile.name}' has no tag '{tag}' (its tags: {have})"
                )
            profile.tags.remove(tag)

        return self._modify(name, change, f"removing tag {tag} from profile {name}")

    def add_rule(
        self, name: str, direction: str, rule: Rule, position: int | None = None
    ) -> Profile:
        """Insert rule so that it becomes rule number ``position`` (1-based, 1..len+1);
        None appends it."""
        direction = check_direction(direction)
        rule = normalized_rule(rule)
        if position is not None:
            _check_number(position, "position")

        def change(profile: Profile) -> None:
            rules = _rules(profile, direction)
            if position is None:
                rules.append(rule)
                return
            if position > len(rules) + 1:
                raise InvalidRequest(
                    f"position {position} is out of range: profile '{profile.name}' has "
                    f"{len(rules)} {direction} rule(s), so a new rule can go at 1 to "
                    f"{len(rules) + 1}"
                )
            rules.insert(position - 1, rule)

        return self._modify(name, change, f"adding a rule to profile {name}")

    def remove_rule(self, name: str, direction: str, index: int) -> Rule:
        """Remove rule number ``index`` (1-based) and return it; NotFound past the last."""
        direction = check_direction(direction)
        _check_number(index, "rule number")
        removed: builtins.list[Rule] = []

        def change(profile: Profile) -> None:
            rules = _rules(profile, direction)
            if index > len(rules):
                raise NotFound(
                    f"profile '{profile.name}' has no {direction} rule {index} "
                    f"(it has {len(rules)})"
                )
            removed[:] = [rules.pop(index - 1)]

        self._modify(name, change, f"removing a rule from profile {name}")
        return removed[0]

    def replace_rules(
        self, name: str, inbound: Sequence[Rule], outbound: Sequence[Rule]
    ) -> Profile:
        """Replace both rule lists at once."""
        new_rules: dict[str, builtins.list[Rule]] = {}
        for direction, rules in (("inbound", inbound), ("outbound", outbound)):
            new_rules[direction] = []
            for index, rule in enumerate(rules):
                try:
                    new_rules[direction].append(normalized_rule(rule))
                except InvalidRequest as exc:
                    raise InvalidRequest(f"{direction} rule {index + 1}: {exc}") from None

        def change(profile: Profile) -> None:
            profile.inbound_rules = builtins.list(new_rules["inbound"])
            profile.outbound_rules = builtins.list(new_rules["outbound"])

        return self._modify(name, change, f"replacing the rules of profile {name}")

    # ---------------------------------------------------------------- helpers

    @_store_errors
    def _modify(self, name: str, change: Callable[[Profile], None], what: str) -> Profile:
        """Read, change a copy, validate, CAS-write; retried from the read on a conflict.

        change edits the profile in place or raises; a change that leaves the profile
        as it was writes nothing.
        """
        check_name(name, "profile name")
        for _ in self._attempts(what):
            entry = self._read(name)
            current = self._load(entry)
            if Profile.from_stored(entry.data)[1]:
                # Writing back what this version read would drop what it cannot read.
                raise Conflict(f"profile '{name}' holds rules or keys this version does "
                               "not know (written by a newer calico-cnm): change it there, "
                               "or replace it whole with `apply`")
            updated = self._load(entry)
            change(updated)
            updated = normalized_profile(updated)
            if updated == current:
                return current
            try:
                self.store.update(entry.key, dumps(updated.to_dict()), entry.revision)
            except RevisionConflict:
                continue
            return updated
        raise AssertionError("unreachable")

    def _read(self, name: str) -> Entry:
        entry = self.store.get(profile_key(name))
        if entry is None:
            raise self._not_found(name)
        return entry

    @staticmethod
    def _not_found(name: str) -> NotFound:
        return NotFound(f"profile '{name}' does not exist")

    @staticmethod
    def _load(entry: Entry) -> Profile:
        try:
            profile, notes = Profile.from_stored(entry.data)
        except (InvalidRequest, ValueError) as exc:
            raise CalicoCnmError(f"stored profile {entry.key} is unreadable: {exc}") from exc
        for note in notes:
            log.warning("stored profile %s (written by a newer version?): %s", entry.key, note)
        return profile

    def _attempts(self, what: str) -> Iterator[int]:
        return cas_attempts(what, self.max_attempts)
