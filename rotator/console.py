"""What the CLI prints for people: safe values, tables that survive a pipe, one-line failures.

Every value that comes from outside (ids, aliases, reasons, sink names, errors) reaches the
terminal only through `show`: rich markup escaped, control characters removed. A table on a
terminal is a rich table; piped, it is tab-separated rows with every value whole, so
`rotator scan | grep key_45c3` finds the key.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from rotator.safety import redact_urls_in, terminal_safe

if TYPE_CHECKING:
    from rich.console import Console


class _OnFirstUse:
    """A rich Console made when first used: a command that prints only JSON (`scan --json`)
    never imports rich, a fifth of its start-up."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


out = cast("Console", _OnFirstUse(soft_wrap=True, emoji=False))
err = cast("Console", _OnFirstUse(stderr=True, soft_wrap=True, highlight=False, emoji=False))

#: A cell: its text, and a rich style for terminals (None: plain).
Cell = tuple[str, str | None] | str


def show(value: object) -> str:
    """A value from outside, safe in a rich table or line: no markup, no control characters."""
    from rich.markup import escape

    return escape(terminal_safe(value))


class Progress:
    """What a long command says while it works, on a terminal's stderr only."""

    def __init__(self, status: Any = None) -> None:
        self._status = status

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)


@contextlib.contextmanager
def progress(text: str) -> Iterator[Progress]:
    """A spinner with `text` on a terminal; nothing (and no rich) when stderr is a pipe or a file."""
    if not sys.stderr.isatty():
        yield Progress()
        return
    with err.status(text) as status:
        yield Progress(status)


def print_json(document: object) -> None:
    """One compact JSON document on stdout (json's C encoder; pipe it to `jq` to read it)."""
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """A rich table on a terminal; tab-separated full values (a header, then rows) otherwise."""
    if out.is_terminal:
        from rich.table import Table

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
