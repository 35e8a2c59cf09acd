"""`kind` -> sink class, resolved lazily; help and validation come from this one table."""

from __future__ import annotations

import difflib
import importlib
import string
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from rotator.errors import PermanentError
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretSink
from rotator.reasons import unknown_key_reason, validation_reason

ENTRY_POINT_GROUP = "rotator.sinks"
BUILTIN: dict[str, str] = {
    "vault": "rotator.sinks.vault:VaultSink",
    "aws": "rotator.sinks.aws:AwsSecretsManagerSink",
    "file": "rotator.sinks.file:EncryptedFileSink",
    "memory": "rotator.sinks.memory:MemorySink",
}


@cache
def kinds() -> dict[str, str]:
    """Every known kind and where its class lives; built-ins win over plugins of the same name."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def resolve(kind: str) -> Any:
    """The sink class for `kind`, with a "did you mean" for a typo."""
    table = kinds()
    target = table.get(kind)
    if target is None:
        close = difflib.get_close_matches(kind, table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PermanentError(f"unknown sink kind {kind!r} (known: {', '.join(sorted(table))}){hint}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check(kind: str, options: Mapping[str, Any], env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every problem with one sink entry, as (key, reason)."""
    try:
        cls = resolve(kind)
    except PermanentError as exc:
        return [("kind", str(exc))]
    except ImportError as exc:
        return [("kind", f"sink {kind!r} cannot be imported: {exc}")]
    try:
        config = cls.Config(**options)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "-"
            reason = (unknown_key_reason(key, ["kind", *cls.Config.model_fields])
                      if error["type"] == "extra_forbidden" else validation_reason(error, key))
            problems.append((key, str(reason).removeprefix("Value error, ")))
        return problems
    return list(config.credential_problems(env))


def key_id_templates(kind: str, options: Mapping[str, Any],
                     fields: tuple[str, ...] = ("key_id",)) -> list[tuple[str, str]]:
    """The sink's path templates that name `{key_id}` (or another of `fields`), as (option,
    template), defaults included: the overlap strategy needs a place that stays put when the key
    id (and, in the alias-template mode, the alias) changes."""
    try:
        config = resolve(kind).Config(**options)
    except (PermanentError, ImportError, ValidationError):
        return []  # reported by `check`
    return [(name, value) for name, value in config if isinstance(value, str) and _names(value, fields)]


def _names(template: str, fields: tuple[str, ...]) -> bool:
    """One of `fields` in any spelling (`{key_id!s}`, `{key_id:s}`)."""
    try:
        return any(field in fields for _, field, _, _ in string.Formatter().parse(template) if field)
    except ValueError:
        return any(field in template for field in fields)


def build(kind: str, options: Mapping[str, Any], fingerprint: Fingerprinter) -> SecretSink:
    cls = resolve(kind)
    sink: SecretSink = cls(cls.Config(**options), fingerprint)
    return sink
