"""The sinks of one rotation, all at once: each prepared before the reset (nothing is reset that
cannot be stored), written in parallel and retried within the bound, read back by fingerprint,
annotated; and the token check of the new secret."""

from __future__ import annotations

import random
from functools import partial

from rotator import logs
from rotator.domain import (
    ApiKey,
)
from rotator.engine.context import Context
from rotator.errors import (
    BudgetSpent,
    RotatorError,
    TransientError,
)
from rotator.protocols import (
    SecretRecord,
    SecretSink,
)

log = logs.get("rotator.engine")


def names(ctx: Context) -> list[str]:
    """Every sink by its name, sorted: what the stored-rotation slot records as holding a secret."""
    return sorted(sink.describe() for sink in ctx.sinks)


def prepare(ctx: Context, key: ApiKey) -> dict[int, object] | str:
    """Every sink must be able to take the write before the key is reset: what each prepared,
    or why one is not ready."""
    prepared: dict[int, object] = {}
    for index, sink in enumerate(ctx.sinks):
        try:
            prepared[index] = sink.prepare(key)
        except RotatorError as exc:
            return f"{sink.describe(key.ref)} is not ready ({exc})"
        except Exception as exc:
            return f"{sink.describe(key.ref)} is not ready ({type(exc).__name__})"
    return prepared


def write_everywhere(ctx: Context, record: SecretRecord, prepared: dict[int, object]) -> dict[str, tuple[str, float]]:
    """Write every sink at once, each retried on transient errors until the bound.

    One sink is written in this thread: handing it to the pool would only lengthen the time the
    secret is in flight."""
    if len(ctx.sinks) == 1:
        return {ctx.sinks[0].describe(record.ref): write_one(ctx, ctx.sinks[0], record, prepared.get(0))}
    futures = {sink.describe(record.ref): ctx.pool.submit(partial(write_one, ctx), sink, record, prepared.get(i))
               for i, sink in enumerate(ctx.sinks)}
    return {name: future.result() for name, future in futures.items()}


def write_one(ctx: Context, sink: SecretSink, record: SecretRecord, prepared: object) -> tuple[str, float]:
    started = ctx.monotonic()
    deadline = started + ctx.sink_retry_s
    delay = 0.2
    while True:
        try:
            sink.write(record, prepared)
            return "ok", ctx.monotonic() - started
        except TransientError as exc:
            if ctx.monotonic() + delay > deadline:
                return write_failed(ctx, sink, record, str(exc)), ctx.monotonic() - started
            log.info("sink.write_retry", sink=sink.describe(record.ref), error=str(exc))
        except RotatorError as exc:
            return write_failed(ctx, sink, record, str(exc)), ctx.monotonic() - started
        except Exception as exc:  # a sink bug must not lose the secret for the other sinks
            log.error("sink.write_crashed", sink=sink.describe(record.ref), error_type=type(exc).__name__)
            return f"failed: {type(exc).__name__}", ctx.monotonic() - started
        ctx.sleep(delay * random.uniform(1.0, 1.5))
        delay = min(delay * 2, max(0.5, min(15.0, ctx.sink_retry_s / 4)))


def write_failed(ctx: Context, sink: SecretSink, record: SecretRecord, error: str) -> str:
    log.warning("sink.write_failed", sink=sink.describe(record.ref), attempt_id=record.attempt_id, error=error)
    return f"failed: {error}"


def read_back(ctx: Context, record: SecretRecord, skip: dict[str, str]) -> dict[str, str]:
    problems = {}
    for sink in ctx.sinks:
        name = sink.describe(record.ref)
        if name in skip:
            continue
        try:
            stored = sink.read_state(record.key)
        except RotatorError as exc:
            problems[name] = f"read-back failed: {exc}"
            continue
        if stored is None or stored.fingerprint != record.fingerprint:
            problems[name] = "read-back fingerprint differs"
    return problems


def annotate(ctx: Context, record: SecretRecord) -> None:
    for sink in ctx.sinks:
        try:
            sink.annotate(record)
        except Exception as exc:  # metadata only: the secret is stored and read back
            log.warning("sink.annotate_failed", sink=sink.describe(record.ref), error_type=type(exc).__name__,
                        error=str(exc) if isinstance(exc, RotatorError) else "")


def check_token(ctx: Context, record: SecretRecord) -> list[str]:
    try:
        if not ctx.keyservice.verify_secret(record.key.client_id, record.secret, key_id=record.key.key_id):
            return ["the new secret does not authenticate"]
    except RotatorError as exc:
        return [f"could not check the new secret: {exc}"]
    except BudgetSpent as spent:  # not a failure: every sink reads the secret back; it is not tried now
        log.warning("rotation.unchecked", client_id=record.key.client_id, key_id=record.key.key_id,
                    until=spent.until, why=spent.why)
    return []
