"""Keys whose secrets a sink would keep in one place (aliases that slug alike under `{alias}`, or a
path without the Client ID): found while a scan pages through the keys, so no rotation needs a
listing of its own. A sink also refuses, at prepare and at write, a place that holds another
key's document; this finds the collision before either key was ever stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
            if first.ref != key.ref and not _lineage(first, key):
                for one, other in ((key, first), (first, key)):
                    self.conflicts.setdefault(str(one.ref), (
                        f"{where} would also hold {other.ref} (alias {other.alias!r}): two keys in one place; "
                        "make the aliases unique per Client ID once slugged, or put {client_id}/{key_id} in "
                        "the path"))

    def add_all(self, keys: Iterable[ApiKey]) -> PlaceIndex:
        for key in keys:
            self.add(key)
        return self


def _lineage(one: ApiKey, other: ApiKey) -> bool:
    """A key and the successor that takes its place (the overlap strategy) share it by design."""
    return one.client_id == other.client_id and (one.replaced_by == other.key_id or other.replaced_by == one.key_id)


def due_with_places(rows: Iterable[ScanRow], sinks: Iterable[SecretSink],
                    retire_at: Callable[[ApiKey, ApiKey], float] | None = None,
                    now: float = 0.0) -> list[tuple[ApiKey, str | None]]:
    """The due keys of a whole scan, each with why another key would share its sink place (None
    when it has one of its own): the scan task and the `--all-due` plan decide from this alone.
    With `retire_at` (when a retiring key's next step is due, given its successor), retiring keys
    whose step is due by `now` are included: the engine revokes them."""
    places = PlaceIndex(sinks)
    due, retiring, successors = [], [], {}
    for row in rows:
        places.add(row.key)
        if row.key.replaces is not None:
            successors[(row.key.client_id, row.key.key_id)] = row.key
        if row.state is KeyState.DUE:
            due.append(row.key)
        elif row.state is KeyState.RETIRING and retire_at is not None:
            retiring.append(row.key)
    for key in retiring:
        successor = successors.get((key.client_id, str(key.replaced_by)))
        if successor is None or (retire_at is not None and retire_at(key, successor) <= now):
            due.append(key)
    return [(key, places.conflicts.get(str(key.ref))) for key in due]
