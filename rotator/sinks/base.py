"""What every sink shares: its settings base, the stored JSON document and path templates."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from rotator.domain import ApiKey, slug, utc_iso
from rotator.errors import ProtocolError, StaleWriteError
from rotator.protocols import SecretRecord, StoredState

TEMPLATE_FIELDS = ("client_id", "key_id", "alias", "environment")


class SinkSettings(BaseModel):
    """Base of each sink's `Config`: unknown keys are errors; credentials are checked at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def credential_problems(self, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
        """Every `*_env` that is named but not set, unless its `*_file` twin is given."""
        for name, value in self:
            if not name.endswith("_env") or not isinstance(value, str):
                continue
            file_twin = getattr(self, name[:-4] + "_file", None)
            if file_twin is not None:
                if not Path(file_twin).is_file():
                    yield (name[:-4] + "_file", f"file {str(file_twin)!r} does not exist")
            elif not env.get(value):
                yield (name, f"environment variable {value} is not set")


def render(template: str, key: ApiKey) -> str:
    """Fill `{client_id}`, `{key_id}`, `{alias}` (slugged) and `{environment}`."""
    return template.format(
        client_id=key.client_id, key_id=key.key_id, alias=slug(key.alias),
        environment=key.environment.value.lower(),
    )


def check_template(template: str) -> str:
    try:
        template.format(**{f: "x" for f in TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"template {template!r} may only use {{client_id}}, {{key_id}}, {{alias}}, "
            f"{{environment}} ({type(exc).__name__}: {exc})"
        ) from None
    return template


def document(record: SecretRecord) -> dict[str, Any]:
    """The stored JSON object (INTERFACE.md): applications read `api_key`."""
    key = record.key
    return {
        "client_id": key.client_id,
        "key_id": key.key_id,
        "alias": key.alias,
        "environment": key.environment.value,
        "api_key": record.secret.reveal(),
        "rotated_at": utc_iso(record.rotated_at),
        "key_reset_at": record.key_reset_at,
        "attempt_id": record.attempt_id,
    }


def encode(record: SecretRecord) -> str:
    return json.dumps(document(record), separators=(",", ":"), sort_keys=True)


def state_from_document(doc: Any, fingerprint: Any, where: str, version: str | None = None) -> StoredState:
    """Read back a stored document as a `StoredState`; the secret is hashed, then dropped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("api_key"), str):
        raise ProtocolError(f"{where}: the stored value is not a rotator secret document")
    reset = doc.get("key_reset_at")
    return StoredState(
        fingerprint=fingerprint(doc["api_key"]),
        attempt_id=doc.get("attempt_id"),
        rotated_at=doc.get("rotated_at"),
        key_reset_at=reset if isinstance(reset, int) else None,
        version=version,
    )


def refuse_if_stale(current: StoredState | None, record: SecretRecord, where: str) -> bool:
    """True when `current` already is this record (nothing to write); raise if it is newer."""
    if current is None:
        return False
    if current.fingerprint == record.fingerprint:
        return True
    if current.key_reset_at is not None and current.key_reset_at > record.key_reset_at:
        raise StaleWriteError(
            f"{where}: holds a newer rotation (key reset at {current.key_reset_at}) than attempt "
            f"{record.attempt_id} (key reset at {record.key_reset_at}); not overwritten"
        )
    return False
