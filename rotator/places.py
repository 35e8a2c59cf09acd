"""Keys whose secrets a sink would keep in one place (aliases that slug alike under `{alias}`, or a
path without the Client ID): found while a scan pages through the keys, so no rotation needs a
listing of its own. A sink also refuses, at prepare and at write, a place that holds another
key's document; this finds the collision before either key was ever stored.
"""

from __future__ import annotations

from collections.abc import Iterable

from rotator.domain import ApiKey, KeyState
from rotator.errors import RotatorError
from rotator.protocols import SecretSink
from rotator.scan import ScanRow


class PlaceIndex:
    """Every key's place in every sink that names one; `conflicts` maps a key to why it collides."""

    def __init__(self, sinks: Iterable[SecretSink]) -> None:
        self._sinks = [s for s in sinks if hasattr(s, "location")]
        self._first: dict[str, ApiKey] = {}
        self.conflicts: dict[str, str] = {}

    def add(self, key: ApiKey) -> None:
        for sink in self._sinks:
            try:
                where = sink.location(key)
            except RotatorError:  # an id no path may be built from: the sink refuses it anyway
                continue
            first = self._first.setdefault(where, key)
            if first.ref != key.ref:
                for one, other in ((key, first), (first, key)):
                    self.conflicts.setdefault(str(one.ref), (
                        f"{where} would also hold {other.ref} (alias {other.alias!r}): two keys in one place; "
                        "make the aliases unique per Client ID once slugged, or put {client_id}/{key_id} in "
                        "the path"))

    def add_all(self, keys: Iterable[ApiKey]) -> PlaceIndex:
        for key in keys:
            self.add(key)
        return self


def due_with_places(rows: Iterable[ScanRow], sinks: Iterable[SecretSink]) -> list[tuple[ApiKey, str | None]]:
    """The due keys of a whole scan, each with why another key would share its sink place (None
    when it has one of its own): the scan task and the `--all-due` plan decide from this alone."""
    places = PlaceIndex(sinks)
    due = []
    for row in rows:
        places.add(row.key)
        if row.state is KeyState.DUE:
            due.append(row.key)
    return [(key, places.conflicts.get(str(key.ref))) for key in due]
