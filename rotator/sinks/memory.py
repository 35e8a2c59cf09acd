"""An in-memory sink: a real plugin for tests, the demo and library users.

It keeps every version, so tests can check what a rotation stored and that the previous secret
stayed readable. Faults can be injected with `fail_next`.
"""

from __future__ import annotations

import json
import threading
from typing import Any, ClassVar

from pydantic import Field

from rotator.domain import ApiKey, KeyRef
from rotator.errors import PermanentError, TransientError
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.sinks.base import SinkSettings, encode, refuse_if_stale, state_from_document

_STORES: dict[str, dict[KeyRef, list[str]]] = {}
_STORES_LOCK = threading.Lock()


class MemorySink:
    kind: ClassVar[str] = "memory"
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    class Config(SinkSettings):
        name: str = Field("default", description="Sinks with the same name share one store.")

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        with _STORES_LOCK:
            self._store = _STORES.setdefault(config.name, {})
        self._lock = threading.Lock()
        self.fail_next: list[Exception] = []
        self.fail_prepare: list[Exception] = []

    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink: its own slot."""
        return self.describe(key.ref)

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"memory:{self.config.name}" + (f"/{ref}" if ref else "")

    def prepare(self, key: ApiKey) -> None:
        with self._lock:
            if self.fail_prepare:
                raise self.fail_prepare.pop(0)

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        where = f"write {self.describe(record.ref)}"
        with self._lock:
            if self.fail_next:
                raise self.fail_next.pop(0)
            versions = self._store.setdefault(record.ref, [])
            current = self._state(versions, where)
            if refuse_if_stale(current, record, where):
                assert current is not None
                return current
            versions.append(encode(record))
            return self._state(versions, where) or _unreachable()

    def annotate(self, record: SecretRecord) -> None:
        return None

    def stored_refs(self) -> list[tuple[str, KeyRef]]:
        """Every key this sink holds a document for, with where: `reconcile` reports the ones the
        key service no longer knows (orphans: dead secrets left behind)."""
        with self._lock:
            return [(self.describe(ref), ref) for ref, versions in self._store.items() if versions]

    def read_state(self, key: ApiKey) -> StoredState | None:
        with self._lock:
            return self._state(self._store.get(key.ref, []), f"read {self.describe(key.ref)}")

    def versions(self, ref: KeyRef) -> list[dict[str, Any]]:
        """Every stored document, oldest first (for tests: they hold secrets)."""
        with self._lock:
            return [json.loads(v) for v in self._store.get(ref, [])]

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _state(self, versions: list[str], where: str) -> StoredState | None:
        if not versions:
            return None
        return state_from_document(json.loads(versions[-1]), self._fingerprint, where,
                                   version=str(len(versions)))

    @staticmethod
    def reset_all() -> None:
        """Forget every store (between tests)."""
        with _STORES_LOCK:
            _STORES.clear()


def _unreachable() -> StoredState:
    raise PermanentError("memory sink lost a write")


__all__ = ["MemorySink", "TransientError"]
