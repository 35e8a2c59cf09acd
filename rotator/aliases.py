"""The overlap strategy's alias template, for a key service whose aliases are unique per Client ID:
a lineage's new key is named from its base alias and a rotation number (`payouts--r3`). Parsing an
alias only proposes a base; a key belongs to a lineage only once rotator has proved it (see
`rotator.engine.successors`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

DEFAULT_TEMPLATE = "{alias}--r{n}"
_LITERAL_RE = re.compile(r"[A-Za-z0-9 ._~+#-]{1,16}")  # what a template adds: plain text an alias may hold


def template_problem(template: str) -> str | None:
    """Why `template` cannot name a lineage's keys, or None: `{alias}` first, then literal text,
    then `{n}`, each once (so an alias parses back to one base and one number)."""
    if template.count("{alias}") != 1 or template.count("{n}") != 1:
        return "must use {alias} and {n} once each"
    if not template.startswith("{alias}"):
        return "must start with {alias} (the lineage's base alias)"
    middle, _, suffix = template[len("{alias}"):].partition("{n}")
    if not middle or "{" in template.replace("{alias}", "").replace("{n}", "") or "}" in middle + suffix:
        return "needs literal text between {alias} and {n}, and no other placeholder"
    if not _LITERAL_RE.fullmatch(middle + suffix):
        return "may add at most 16 characters of letters, digits, space, '.', '_', '-', '~', '+' or '#' to an alias"
    return None


@dataclass(frozen=True)
class AliasTemplate:
    """`{alias}--r{n}`: `derive("payouts", 2)` is `payouts--r2`; `parse("payouts--r2")` is
    `("payouts", 2)`; a base alias is rotation 0."""

    text: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        problem = template_problem(self.text)
        if problem is not None:
            raise ValueError(f"alias template {self.text!r} {problem}")

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        middle, _, suffix = self.text[len("{alias}"):].partition("{n}")
        # The base is greedy: `a--r1--r2` is rotation 2 of `a--r1` (a person's key that became a base).
        return re.compile(f"(?P<base>.+){re.escape(middle)}(?P<n>[1-9][0-9]{{0,8}}){re.escape(suffix)}", re.S)

    def derive(self, base: str, n: int) -> str:
        return base if n == 0 else self.text.replace("{alias}", base).replace("{n}", str(n))

    def parse(self, alias: str) -> tuple[str, int] | None:
        """The base and rotation number an alias would have if it were derived, or None."""
        match = self._pattern.fullmatch(alias)
        return (match["base"], int(match["n"])) if match else None

    def number(self, alias: str, base: str) -> int | None:
        """`alias`'s rotation number within the lineage of `base` (0: the base itself), or None."""
        if alias == base:
            return 0
        parsed = self.parse(alias)
        return parsed[1] if parsed is not None and parsed[0] == base else None

    def next_free(self, base: str, current: str, taken: set[str]) -> str:
        """The alias of the lineage's next key: one past `current`'s number, skipping every alias
        already taken (a person's key named like a derived one is passed by, never fought over)."""
        n = (self.number(current, base) or 0) + 1
        while self.derive(base, n) in taken:
            n += 1
        return self.derive(base, n)
