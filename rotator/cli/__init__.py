"""The `rotator` command. Thin: it parses, calls the library, and prints.

Exit codes: 0 success, 1 a rotation or check failed, 2 bad usage or configuration. With `--json`,
stdout carries one JSON document and nothing else; progress and messages go to stderr.

Every value that comes from outside reaches a table or a line only through `rotator.console`
(markup escaped, control characters removed; piped tables print whole values). `--json` prints
values exactly (JSON escapes controls itself). A service that does not answer (Redis, the broker,
the key service) is one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import sys

# Each module adds its commands to `app` when imported; this order is the order of `--help`.
from rotator.cli import audit, checks, keys, rotation, services, views  # noqa: F401
from rotator.cli.base import app
from rotator.console import err, out

__all__ = ["app", "err", "main", "out"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
