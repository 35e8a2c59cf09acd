"""Why a configuration value was refused, in one line: the settings and every sink's own options
give the same reasons (a did-you-mean where one fits, the value only where it cannot be a
credential). Below both, so neither imports the other for it."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from rotator.safety import excerpt, might_be_secret, redact_url


def unknown_key_reason(leaf: str, known: list[str]) -> str:
    """Why a key is unknown: an inline credential, a typo with its likely meaning, or neither."""
    credential = next((f"{leaf}{end}" for end in ("_env", "_file") if f"{leaf}{end}" in known), None)
    if credential is None and leaf in ("key", "token", "password", "secret", "secret_id", "role_id"):
        credential = next((k for k in known if k.endswith(("_env", "_file"))), None)
        leaf = credential.rsplit("_", 1)[0] if credential else leaf
    if credential is not None:
        ways = " or ".join(f"`{leaf}{end}`" for end in ("_env", "_file") if f"{leaf}{end}" in known)
        return f"unknown key: credentials are never inline; use {ways} (the value is not shown)"
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    return f"unknown key; did you mean {close[0]!r}?" if close else (
        f"unknown key; known here: {', '.join(known)}" if known else "unknown key")


_SENSITIVE_KEY_PARTS = ("_env", "_file", "token", "secret", "password", "key")


def validation_reason(error: Any, key: str = "",
                      known_keys: Callable[[tuple[int | str, ...]], list[str]] = lambda loc: []) -> str:
    """A validation error's reason; it quotes the value only where the value cannot be a credential
    (never for `*_env`, `*_file`, tokens, secrets, keys; URLs with their credentials redacted).
    `known_keys` gives the keys allowed where an unknown one was found, for its did-you-mean."""
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        loc = tuple(error.get("loc", ()))
        return unknown_key_reason(str(loc[-1]) if loc else "", known_keys(loc))
    if kind == "missing":
        return "required key is missing"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    value = error.get("input")
    leaf = key.rsplit(".", 1)[-1].lower()
    if any(part in leaf for part in _SENSITIVE_KEY_PARTS):
        return message + " (the value is not shown)"
    if isinstance(value, str) and "url" in leaf:
        shown = redact_url(value)
        if "@" in shown and "***@" not in shown:  # not a URL that parses: keep only what follows the credentials
            shown = "…@" + shown.rsplit("@", 1)[1]
        return f"{message} (got {excerpt(shown, 80)})"
    if isinstance(value, str) and kind != "value_error" and might_be_secret(value):  # a token in the wrong key
        return message + " (the value is not shown: it looks like a credential)"
    if isinstance(value, str | int | float | bool) and kind != "value_error":
        shown = excerpt(value, 80) if isinstance(value, str) else repr(value)
        choices = re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", "")))
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6) if isinstance(value, str) else []
        return f"{message} (got {shown}" + (f"; did you mean {close[0]!r}?)" if close else ")")
    return message
