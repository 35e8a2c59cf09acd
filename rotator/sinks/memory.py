"""An in-memory sink: a real plugin for tests, the demo and library users.

It keeps every version, so tests can check what a rotation stored and that the previous secret
stayed readable. Faults can be injected with `fail_next`. Places are named by a path template like
the other sinks' (by `{alias}`, a key and its overlap successor share one).
"""

from __future__ import annotations

import json
import threading
from typing import Any, ClassVar

from pydantic import Field, field_validator

from rotator.domain import ApiKey, KeyRef, Secret
from rotator.errors import PermanentError, TransientError
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.sinks.base import (
    SinkSettings,
    check_template,
    encode,
    ref_of_document,
    refuse_if_stale,
    render,
    secret_from_document,
    state_from_document,
)

_STORES: dict[str, dict[str, list[str]]] = {}
_STORES_LOCK = threading.Lock()


class MemorySink:
    kind: ClassVar[str] = "memory"
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    class Config(SinkSettings):
        name: str = Field("default", description="Sinks with the same name share one store.")
        path: str = Field("{client_id}/{key_id}", description="Place template.")

        _check_path = field_validator("path")(check_template)

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        with _STORES_LOCK:
            self._store = _STORES.setdefault(config.name, {})
        self._lock = threading.Lock()
        self.fail_next: list[Exception] = []
        self.fail_prepare: list[Exception] = []

    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink: the slot its path names."""
        return f"memory:{self.config.name}/{render(self.config.path, key)}"

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"memory:{self.config.name}" + (f"/{ref}" if ref else "")

    def prepare(self, key: ApiKey) -> None:
        """The slot, if it holds anything, holds this key's or its predecessor's secret."""
        with self._lock:
            if self.fail_prepare:
                raise self.fail_prepare.pop(0)
            self._state(self._store.get(render(self.config.path, key), []), f"prepare {self.location(key)}", key,
                        writing=True)

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        where = f"write {self.location(record.key)}"
        with self._lock:
            if self.fail_next:
                raise self.fail_next.pop(0)
            versions = self._store.setdefault(render(self.config.path, record.key), [])
            current = self._state(versions, where, record.key, writing=True)
            if refuse_if_stale(current, record, where):
                assert current is not None
                return current
            versions.append(encode(record))
            return self._state(versions, where, record.key) or _unreachable()

    def annotate(self, record: SecretRecord) -> None:
        return None

    def stored_refs(self) -> list[tuple[str, KeyRef]]:
        """Every key this sink holds a document for, with where: `reconcile` reports the ones the
        key service no longer knows (orphans: dead secrets left behind)."""
        with self._lock:
            found = [(place, ref_of_document(json.loads(versions[-1])))
                     for place, versions in self._store.items() if versions]
        return [(f"memory:{self.config.name}/{place}", ref) for place, ref in found if ref is not None]

    def read_state(self, key: ApiKey) -> StoredState | None:
        with self._lock:
            return self._state(self._store.get(render(self.config.path, key), []), f"read {self.location(key)}", key)

    def read_secret(self, key: ApiKey) -> Secret | None:
        with self._lock:
            versions = self._store.get(render(self.config.path, key), [])
            return secret_from_document(json.loads(versions[-1]), f"read {self.location(key)}", key) if versions \
                else None

    def versions(self, key: ApiKey | KeyRef) -> list[dict[str, Any]]:
        """Every stored document of the key's place, oldest first (for tests: they hold secrets). A
        bare `KeyRef` names the place whose newest document is that key's."""
        with self._lock:
            if isinstance(key, ApiKey):
                stored = self._store.get(render(self.config.path, key), [])
            else:
                stored = next((v for v in self._store.values() if v and ref_of_document(json.loads(v[-1])) == key), [])
            return [json.loads(v) for v in stored]

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _state(self, versions: list[str], where: str, key: ApiKey, *, writing: bool = False) -> StoredState | None:
        if not versions:
            return None
        return state_from_document(json.loads(versions[-1]), self._fingerprint, where,
                                   version=str(len(versions)), key=key, writing=writing)

    @staticmethod
    def reset_all() -> None:
        """Forget every store (between tests)."""
        with _STORES_LOCK:
            _STORES.clear()


def _unreachable() -> StoredState:
    raise PermanentError("memory sink lost a write")


__all__ = ["MemorySink", "TransientError"]
