"""Structured logging with structlog: JSON lines for machines, readable lines for people.

`ROTATOR_LOG_FORMAT=json` or `console` chooses; unset, a command run by a person (`rotator
status`, `reconcile`, ...) writes readable lines, and a worker or beat writes JSON unless its
stderr is a terminal. Levels are kept: a worker never turns an info line into a warning.

A processor drops any value that is a `Secret`, as a last guard: secrets are never passed to a
logger on purpose. Every URL in a log line, ours or a library's (httpx logs each request's URL at
INFO), has its credentials redacted as `user:***@`, and the Idempotency-Key of a stored-answer
path (it reads the live secret) as `{IdempotencyKey}`.

structlog (with its console renderer) is imported on the first log call, not at start-up: a
command that logs nothing, such as `rotator scan --json`, does not pay for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from rotator.domain import Secret
from rotator.safety import redact_urls_in

CHATTY_CLIENTS = ("botocore", "boto3", "s3transfer", "urllib3", "hvac", "httpcore", "httpx")


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in list(event.items()):
        if isinstance(value, Secret):
            event[name] = "[redacted]"
    return event


def _redact_urls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in list(event.items()):
        if isinstance(value, str):
            event[name] = redact_urls_in(value)
    return event


class RedactUrls(logging.Filter):
    """A stdlib logging filter: the record's message with every URL's credentials redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = redact_urls_in(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_REDACT = RedactUrls()


def _stderr_logger(*_: Any) -> Any:
    """One write per line (the line and its newline together): prefork children share the worker's
    stderr, and a line written in two parts can take another process's line between them."""
    import structlog

    return structlog.WriteLogger(sys.stderr)


_wanted: tuple[int, bool] | None = None  # level and JSON-or-not, applied to structlog on first use
_applied: tuple[int, bool] | None = None


def json_wanted(for_people: bool = False) -> bool:
    """JSON lines or readable ones: `$ROTATOR_LOG_FORMAT`, else readable for people and terminals."""
    chosen = os.environ.get("ROTATOR_LOG_FORMAT", "").lower()
    if chosen in ("json", "console"):
        return chosen == "json"
    if chosen:
        print(f"warning: ROTATOR_LOG_FORMAT is json or console, not {chosen[:20]!r}; using the default",
              file=sys.stderr)
    return not (for_people or sys.stderr.isatty())


class JsonLines(logging.Formatter):
    """Other libraries' log records (httpx, Celery) as the same JSON lines as rotator's own."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        line = {"event": record.getMessage(), "level": record.levelname.lower(), "logger": record.name,
                "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z"}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str | None = None, json_lines: bool | None = None, *, for_people: bool = False) -> None:
    """Route structlog and stdlib logging to stderr at `level` (default `$ROTATOR_LOG_LEVEL`)."""
    name = (level or os.environ.get("ROTATOR_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json_lines is None:
        json_lines = json_wanted(for_people)
    global _wanted
    _wanted = (numeric, json_lines)
    if "structlog" in sys.modules:
        _apply_structlog()
    logging.basicConfig(level=numeric, stream=sys.stderr)
    logging.getLogger().setLevel(numeric)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # ours, from basicConfig (not a test's capture)
            handler.setFormatter(JsonLines() if json_lines else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    # These clients log request bodies at DEBUG (botocore prints SecretString): never below INFO.
    for name in CHATTY_CLIENTS:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))
        if _REDACT not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_REDACT)
    for handler in logging.getLogger().handlers:
        if _REDACT not in handler.filters:
            handler.addFilter(_REDACT)


def _apply_structlog() -> None:
    """Configure structlog as `configure` last asked (INFO, by the terminal, if it never was)."""
    global _applied
    import structlog

    numeric, json_lines = _wanted or (logging.INFO, json_wanted())
    _applied = (numeric, json_lines)
    renderer: Any = (structlog.processors.JSONRenderer() if json_lines
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            _redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,  # resolved per call: follows a redirected stderr
        cache_logger_on_first_use=False,
    )


class _Logger:
    """A structlog logger that imports and configures structlog on its first call."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, method: str) -> Any:
        if _applied is None or (_wanted is not None and _applied != _wanted):
            _apply_structlog()
        import structlog

        return getattr(structlog.get_logger(self._name), method)


def get(name: str = "rotator") -> Any:
    return _Logger(name)
