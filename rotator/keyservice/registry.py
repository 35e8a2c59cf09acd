"""`keyservice.kind` -> the function that builds that adapter, resolved lazily, like the sinks'.

The built-in kinds are registered through the entry-point group `rotator.keyservices` (and named
here as well, so a checkout that was never installed still finds them); a third-party adapter is a
package that adds its own entry point (docs/plugins.md). A built-in kind wins over a plugin's of
the same name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from rotator.errors import PermanentError

if TYPE_CHECKING:
    from rotator.protocols import KeyService

ENTRY_POINT_GROUP = "rotator.keyservices"
BUILTIN: dict[str, str] = {
    "http": "rotator.keyservice.http:build",
    "emulator": "rotator.keyservice.emulator_http:build",
    "aws-iam": "rotator.keyservice.aws_iam:build",
}
#: What a `kind` resolves to: builds the adapter from the `[keyservice]` section and the policy's
#: overlap grace (AWS IAM deletes a deactivated key after it).
Builder = Callable[[Any, float], "KeyService"]


@cache
def kinds() -> dict[str, str]:
    """Every known kind and where its builder lives."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def unknown(kind: str) -> str | None:
    """Why `kind` names no key service (with a "did you mean" for a typo); None when it does."""
    table = kinds()
    if kind in table:
        return None
    close = difflib.get_close_matches(kind, table, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key service kind {kind!r} (known: {', '.join(sorted(table))}){hint}"


def resolve(kind: str) -> Builder:
    """The builder for `kind` (imported now); a kind that names none, or cannot be imported, is one line."""
    problem = unknown(kind)
    if problem is not None:
        raise PermanentError(problem)
    try:
        builder: Builder = EntryPoint(kind, kinds()[kind], ENTRY_POINT_GROUP).load()
    except (ImportError, AttributeError) as exc:
        raise PermanentError(f"key service kind {kind!r} cannot be imported ({kinds()[kind]}: "
                             f"{type(exc).__name__}: {exc})") from None
    return builder
