"""Properties of the attempt protocol's pure parts: the transition table, `judge` and the keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rotator.domain import Generation, KeyRef, Replay
from rotator.protocol import TRANSITIONS, Phase, ProtocolViolation, Step, advance, idempotency_key, judge

MAC = b"k" * 32
phases = st.sampled_from(list(Phase))
steps = st.sampled_from(list(Step))
dates = st.integers(min_value=946_684_800, max_value=4_102_444_800)
generations = st.builds(lambda c, d: Generation(c, c + d), dates, st.integers(min_value=0, max_value=10**8))
waits = st.floats(min_value=0, max_value=10**6, allow_nan=False)
replays = st.sampled_from(list(Replay))
HORIZON = 90.0


@given(phases, steps)
def test_advance_follows_the_table_and_refuses_the_rest(phase: Phase, step: Step) -> None:
    """Every listed pair moves as the table says; every other pair is a named protocol violation."""
    if (phase, step) in TRANSITIONS:
        assert advance(phase, step) is TRANSITIONS[(phase, step)]
    else:
        with pytest.raises(ProtocolViolation):
            advance(phase, step)


def test_nothing_leaves_done_and_only_storing_reaches_it() -> None:
    """The record ends (DONE) only from STORING on STORED: only when every sink reads the secret back."""
    assert not [pair for pair in TRANSITIONS if pair[0] is Phase.DONE]
    assert [pair for pair, t in TRANSITIONS.items() if t.to is Phase.DONE] == [(Phase.STORING, Step.STORED)]


def test_no_path_back_to_idle_keeps_an_answered_secret() -> None:
    """Once an answer is in hand (STORING), the only way to IDLE is LOST (the secret is proved gone)."""
    assert {step for (phase, step), t in TRANSITIONS.items() if phase is Phase.STORING and t.to is Phase.IDLE} == {
        Step.LOST}


@given(st.sampled_from([Phase.IN_DOUBT, Phase.STORING]), st.one_of(st.none(), generations), generations, replays,
       st.one_of(st.none(), generations), waits)
def test_judge_is_never_rash(phase: Phase, replaced: Generation | None, now: Generation, replay: Replay,
                             answered: Generation | None, waited: float) -> None:
    """"Not run" needs an empty replay, the horizon passed and the very generation the attempt set out
    to replace; "lost" is never said inside the horizon unless the key moved past a stored answer."""
    step = judge(phase, replaced, now, replay, answered if replay is Replay.ANSWER else None, waited, HORIZON)
    if step is Step.NOT_RUN:
        assert replay is Replay.EMPTY and waited >= HORIZON and replaced == now and phase is Phase.IN_DOUBT
    if step is Step.SPENT:  # only a key whose stored answer failed moves to the next epoch
        assert replay is Replay.SPENT and waited >= HORIZON
        assert (replaced == now and phase is Phase.IN_DOUBT) or phase is Phase.STORING
    if step is Step.SPENT and phase is Phase.STORING:  # a stored failure after a 200: a violation, kept
        assert (phase, step) not in TRANSITIONS
    if replay is Replay.SPENT and waited < HORIZON:
        assert step is Step.NO_ANSWER
    if step is Step.LOST and waited < HORIZON:
        assert replay is Replay.ANSWER and answered is not None and now > answered
    if step is Step.ANSWERED:
        assert replay is Replay.ANSWER and answered == now
    if replay is Replay.UNKNOWN:
        assert step is Step.NO_ANSWER
    if replay is Replay.REFUSED:
        assert step is Step.REFUSED


@given(generations, waits)
def test_a_stored_answer_for_the_current_generation_is_always_stored(now: Generation, waited: float) -> None:
    """A replay that names the key's current generation is the live secret, whatever the time."""
    assert judge(Phase.IN_DOUBT, None, now, Replay.ANSWER, now, waited, HORIZON) is Step.ANSWERED


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40), generations,
       st.integers(min_value=0, max_value=100))
def test_idempotency_keys_fit_the_contract_and_name_one_generation(client: str, key: str, gen: Generation,
                                                                   epoch: int) -> None:
    """16..36 characters of [A-Za-z0-9-], the same for the same inputs, another for another generation or epoch."""
    ref = KeyRef(client, key)
    ik = idempotency_key(MAC, ref, gen, epoch)
    assert re.fullmatch(r"[A-Za-z0-9-]{16,36}", ik)
    assert ik == idempotency_key(MAC, ref, gen, epoch)
    assert ik != idempotency_key(MAC, ref, Generation(gen.created_at, gen.born_at + 1), epoch)
    assert ik != idempotency_key(MAC, ref, gen, epoch + 1)
    assert ik != idempotency_key(b"another-installation-key-0000000", ref, gen, epoch)


def test_the_protocol_document_shows_the_current_table() -> None:
    """docs/protocol.md embeds the diagram and the table generated from TRANSITIONS."""
    from pathlib import Path

    from rotator.protocol import diagram, table

    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    assert diagram() in text and table() in text


def test_attempt_records_of_the_previous_release_still_read() -> None:
    """A record written before `doubt_since` existed reads with it unset (its `since` counts), and a
    record with a field this release does not know still reads (a rolling upgrade either way)."""
    from rotator.domain import AttemptRecord

    older = {"client_id": "acme", "key_id": "key_1", "attempt_id": "a", "idempotency_key": "r2-" + "0" * 32,
             "generation": "1700000000:1700000000", "epoch": 0, "trigger": "schedule", "started_at": 10.0,
             "phase": "in_doubt", "since": 20.0, "issued_generation": None, "fingerprint": None,
             "action": "reset", "issued_key_id": None, "replaces": None}
    record = AttemptRecord.from_dict(older)
    assert (record.doubt_since, record.since, record.phase) == (0.0, 20.0, "in_doubt")
    newer = {**record.to_dict(), "doubt_since": 15.0, "a_field_of_a_later_release": 1}
    assert AttemptRecord.from_dict(newer).doubt_since == 15.0


def test_a_refusal_ends_an_attempt_unless_it_replaces_a_lost_secret() -> None:
    """`judge`: a stored 4xx is REFUSED (the record is cleared), but for an attempt that replaces a
    lost secret it is STILL_LOST, a transition that keeps the record in doubt with the next key."""
    from rotator.domain import Generation, Replay
    from rotator.protocol import TRANSITIONS, Phase, Step, advance, judge, refusal

    g = Generation(1_700_000_000, 1_700_000_000)
    for phase in (Phase.RESETTING, Phase.IN_DOUBT):
        assert judge(phase, g, g, Replay.REFUSED, None, 999.0, 90.0) is Step.REFUSED
        step = judge(phase, g, g, Replay.REFUSED, None, 999.0, 90.0, after_loss=True)
        assert step is Step.STILL_LOST and advance(phase, step).to is Phase.IN_DOUBT
        assert "the next sweep sends it" in TRANSITIONS[(phase, step)].durable
    assert refusal(False) is Step.REFUSED and refusal(True) is Step.STILL_LOST
