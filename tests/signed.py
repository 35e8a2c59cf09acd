"""Task messages put in the queue by a test, signed as a trusted process on this host would sign
them, or forged in a chosen way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import signals

from rotator.safety import private_state_dir
from rotator.signing import HEADER, Signer, default_name, load_or_make

Tamper = Callable[[dict[str, Any], Any], None]


def local_signer() -> Signer:
    """The embedded default signer of this user on this host: what a worker started by the tests
    signs its own retries with and trusts (their configs have no [signing] section)."""
    return Signer(default_name(), load_or_make(private_state_dir() / "signing.key"))


@contextmanager
def publishing_as(signer: Signer | None, *, origin: str | None = None, issued_at: float | None = None,
                  same_stamp: bool = False, tamper: Tamper | None = None,
                  prepare: Tamper | None = None) -> Iterator[list[dict[str, Any]]]:
    """Every task published in the block carries `signer`'s stamp (none with None; it replaces any
    other). `same_stamp`: a message with a task id sent before gets that message's stamp again (a
    replay of the very same message). `prepare(headers, body)` changes the message before signing
    (the signer signs whatever it holds), `tamper(headers, body)` after.
    Yields the stamps made."""
    stamps: dict[str, dict[str, Any]] = {}
    made: list[dict[str, Any]] = []

    def stamp(sender: Any = None, body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        assert headers is not None
        headers.pop(HEADER, None)
        if prepare is not None:
            prepare(headers, body)
        if signer is not None:
            task_id = str(headers.get("id"))
            if not (same_stamp and task_id in stamps):
                stamps[task_id] = signer.stamp(headers, body, origin or signer.name,
                                               time.time() if issued_at is None else issued_at)
                made.append(stamps[task_id])
            headers[HEADER] = stamps[task_id]
        if tamper is not None:
            tamper(headers, body)

    signals.before_task_publish.connect(stamp, weak=False)
    try:
        yield made
    finally:
        signals.before_task_publish.disconnect(stamp)
