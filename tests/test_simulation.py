"""The deterministic simulation (tests/sim.py): thousands of seeded adversarial schedules against the
real engine, and proof that it catches the failures the protocol exists to prevent."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rotator import logs, protocol
from rotator.engine import attempt, lineage, overlap, records, report, sinkio
from tests import sim

SEEDS = int(os.environ.get("ROTATOR_SIM_SEEDS", "10000"))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logs.configure("CRITICAL")
    yield
    logs.configure("WARNING")


@pytest.mark.timeout(900)
def test_thousands_of_adversarial_schedules_keep_every_invariant() -> None:
    """Crashes, freezes past the lease, redeliveries, late commits, 5xx, lost answers, refusals, lost
    and lying sink writes, lost Redis writes and a Redis restart: no generation is reset twice, no
    record is deleted while its live secret is unstored, and after recovery every sink holds every
    live secret (ROTATOR_SIM_SEEDS seeds; a failure names the seed to replay)."""
    started = time.monotonic()
    resets = in_doubt = creates = revoked = by_alias = 0
    for seed in range(SEEDS):
        try:
            run = sim.run_seed(seed)
        except sim.Violation as exc:
            trace = "\n".join(getattr(exc, "trace", [])[-120:])
            pytest.fail(f"{exc}\n--- the last steps of seed {seed} ---\n{trace}\n"
                        f"replay: python -m tests.sim --seed {seed} --trace")
        resets += len(run.service.ledger)
        in_doubt += sum(1 for e in run.events.events if e.name == "rotation.in_doubt")
        creates += len(run.service.creates)
        revoked += len(run.service.revoked)
        by_alias += not run.service.successors and bool(run.service.creates)
    print(f"\n{SEEDS} seeds, {resets} resets, {creates} successors created ({by_alias} runs under derived aliases), "
          f"{revoked} keys revoked, {in_doubt} in doubt, {time.monotonic() - started:.1f}s")
    assert resets > SEEDS // 4 and in_doubt > SEEDS // 20  # the schedules did reset, and did get in doubt
    assert creates > SEEDS // 4 and revoked > SEEDS // 4  # half the runs rotate by overlap, to the end
    assert by_alias > SEEDS // 8  # half of those against the contract as published (no successors)


def test_seeds_past_the_default_run_that_once_lost_a_secret() -> None:
    """Seeds beyond the default 10,000 that found a protocol bug, replayed on every run: 11281, a
    fresh reset after a lost answer refused with a stored 403, whose record was then cleared and the
    key's live secret left in no sink."""
    for seed in (11281,):
        sim.run_seed(seed)


def first_violation(seeds: int, containing: str = "", durable: bool = False) -> str | None:
    for seed in range(seeds):
        try:
            sim.run_seed(seed, durable=durable)
        except sim.Violation as exc:
            if containing in str(exc):
                return str(exc)
    return None


def test_it_catches_an_in_doubt_reset_read_as_never_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first engine's bug: "no stored answer yet" read as "did not run" (no horizon), and the
    record cleared instead of the same key being sent again."""
    real = protocol.judge
    monkeypatch.setattr(attempt, "judge", lambda phase, replaced, now, replay, answered, waited, horizon, **kw:
                        real(phase, replaced, now, replay, answered, waited, 0.0, **kw))

    def clear(ctx: Any, key: Any, record: Any, lease: Any, success_event: str, step: Any = None) -> Any:
        ctx.state.delete_attempt(record, lease)
        return report.skipped(ctx, key, record.trigger, "the reset never ran; record cleared")

    settle = attempt.settle
    monkeypatch.setattr(attempt, "send_again", clear)
    monkeypatch.setattr(attempt, "settle", lambda ctx, record, lease, why="", success_event="rotation.recovered",
                        resend=True: settle(ctx, record, lease, why, success_event, True))
    assert first_violation(2000, "not in every sink", durable=True) is not None


def test_it_catches_the_next_epoch_sent_when_nothing_is_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing stored past the horizon must send the same key again, not the next epoch's: when the
    horizon is cut short (Redis's clock jumps ahead) while a gateway's late commit is still on its
    way, a new key resets the key a second time; the same key is blocked (409) and collapses onto
    the late commit's answer."""
    real = protocol.judge

    def next_epoch(*args: Any, **kwargs: Any) -> protocol.Step:
        step = real(*args, **kwargs)
        return protocol.Step.SPENT if step is protocol.Step.NOT_RUN else step

    monkeypatch.setattr(attempt, "judge", next_epoch)
    assert first_violation(1200, "reset twice") is not None


def test_it_catches_a_fresh_idempotency_key_per_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first engine's other bug: a new Idempotency-Key per attempt instead of per generation.
    Once Redis loses the record, nothing can find the answer again: a live secret stays unstored."""
    import hashlib

    monkeypatch.setattr(records, "key_of", lambda ctx, record: "r1-" + hashlib.sha256(
        record.attempt_id.encode()).hexdigest()[:32])
    assert first_violation(2000, containing="not stored") is not None


def test_it_catches_an_idempotency_key_in_a_replay_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason of a failed replay once named the stored answer's path, and with it the key that
    reads the live secret; it went into results, events and the history."""
    from dataclasses import replace

    from rotator.domain import Replay
    from rotator.keyservice.http import HttpKeyService

    real = HttpKeyService._replay

    def naming_the_path(self: Any, client_id: str, wanted: str, key: str, judge: Any) -> Any:
        answer = real(self, client_id, wanted, key, judge)
        failed = answer.kind is Replay.UNKNOWN
        return replace(answer, reason=f"{answer.reason} (GET /responses/{key})") if failed else answer

    monkeypatch.setattr(HttpKeyService, "_replay", naming_the_path)
    assert first_violation(300, "Idempotency-Keys reached") is not None


def test_it_catches_a_record_deleted_before_the_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink that acknowledged a write it lost must keep the record: ending on the write's
    acknowledgement alone would delete it while the secret is in no sink."""
    monkeypatch.setattr(sinkio, "read_back", lambda ctx, record, skip: {})
    assert first_violation(3000) is not None


def test_it_catches_a_revoke_while_a_sink_still_holds_the_old_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlap strategy's rule: the replaced key is revoked only while every sink holds the
    successor. Without the check, a sink that lost the successor's write still serves the old
    key when it is revoked."""
    monkeypatch.setattr(lineage, "successor_problem", lambda ctx, successor: None)
    assert first_violation(3000, "still holds") is not None


def test_it_catches_a_revoke_before_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lineage, "retire_at", lambda ctx, key, successor: 0.0)
    assert first_violation(3000, "before its successor's grace") is not None


def test_it_catches_a_lost_create_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A create whose answer is gone must not be forgotten: its successor, held by nobody, would
    stay (and block the next one). Recovery that drops the record without revoking it fails."""
    def forget(ctx: Any, key: Any, successor: Any, record: Any, lease: Any) -> None:
        ctx.state.delete_attempt(record, lease)

    monkeypatch.setattr(overlap, "drop_orphan", forget)
    assert first_violation(3000) is not None


def test_it_catches_a_grace_counted_from_the_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink that was down when the successor was created and is written later gives its
    consumers the whole grace: counting it from the successor's creation revokes the old key
    while they have only just been able to move over."""
    monkeypatch.setattr(lineage, "stored_at", lambda ctx, successor: float(successor.created_at))
    assert first_violation(3000, "counted from when every sink held it") is not None


def test_it_catches_a_lineage_guessed_from_a_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without successors, a lineage is proved by the create's answer or the sinks. Proving it
    from the listing instead (any older key of the alias's base is taken for the one replaced)
    links keys that are no successors of each other, and the sweeps revoke or store on that guess."""
    from rotator.engine import successors

    def guessed(self: Any, client_id: str, key: Any, listing: Any = None) -> Any:
        keys = list(self.inner.list_keys(client_id)) if listing is None else listing
        parsed = self.template.parse(key.alias)
        older = [k for k in keys if parsed and k.alias == parsed[0] and k.key_id != key.key_id]
        if not older:
            return {**self.state.lineage_links(client_id), key.key_id: {"base": key.alias}}
        links = {key.key_id: {"base": parsed[0], "replaces": older[0].key_id},
                 older[0].key_id: {"base": parsed[0], "replaced_by": key.key_id}}
        self.state.put_lineage_links(client_id, links)
        return {**self.state.lineage_links(client_id), **links}

    monkeypatch.setattr(successors.AliasSuccessors, "prove", guessed)
    assert first_violation(3000) is not None


def test_it_catches_an_alias_lineage_lost_with_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without successors, what Redis held of a lineage must be rebuilt from the sinks and the
    stored create answers: a key the store no longer links, taken for its own base, is created
    again (a second live successor) or never retired."""
    from rotator.engine import successors

    def own_base(self: Any, client_id: str, key: Any, listing: Any = None) -> Any:
        return {**self.state.lineage_links(client_id), key.key_id: {"base": key.alias}}

    monkeypatch.setattr(successors.AliasSuccessors, "prove", own_base)
    assert first_violation(3000) is not None
