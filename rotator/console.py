"""What the CLI prints for people: safe values, tables that survive a pipe, one-line failures.

Every value that comes from outside (ids, aliases, reasons, sink names, errors) reaches the
terminal only through `show`: rich markup escaped, control characters removed. A table on a
terminal is a rich table; piped, it is tab-separated rows with every value whole, so
`rotator scan | grep key_45c3` finds the key.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rotator.safety import redact_urls_in, terminal_safe

out = Console(soft_wrap=True, emoji=False)
err = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)

#: A cell: its text, and a rich style for terminals (None: plain).
Cell = tuple[str, str | None] | str


def show(value: object) -> str:
    """A value from outside, safe in a rich table or line: no markup, no control characters."""
    return escape(terminal_safe(value))


def print_json(document: object) -> None:
    """One compact JSON document on stdout (json's C encoder; pipe it to `jq` to read it)."""
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """A rich table on a terminal; tab-separated full values (a header, then rows) otherwise."""
    if out.is_terminal:
        table = Table(*columns)
        for row in rows:
            table.add_row(*(_styled(cell) for cell in row))
        out.print(table)
        return
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_plain(cell) for cell in row))
    print("\n".join(lines))


def _styled(cell: Cell) -> str:
    text, style = (cell, None) if isinstance(cell, str) else cell
    return f"[{style}]{show(text)}[/{style}]" if style else show(text)


def _plain(cell: Cell) -> str:
    text = cell if isinstance(cell, str) else cell[0]
    return terminal_safe(text).replace("\t", " ").replace("\n", " ")


def unreachable(exc: BaseException) -> str | None:
    """One line for a service that did not answer (Redis, the broker, a socket); None for any
    other error, which is a bug and keeps its traceback."""
    module = type(exc).__module__
    detail = redact_urls_in(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if module.startswith("redis"):
        return f"Redis did not answer ({type(exc).__name__}: {detail})"
    if module.startswith(("kombu", "amqp")):
        return f"the Celery broker did not answer or refused ({type(exc).__name__}: {detail})"
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"a service did not answer ({type(exc).__name__}: {detail})"
    return None
