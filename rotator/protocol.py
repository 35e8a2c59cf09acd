"""The attempt protocol: exactly one reset per key generation, and never a lost one-time secret.

Everything that decides a transition lives here; there is no I/O (the engine does it), so tests
drive it step by step. The rules:

1. **One Idempotency-Key per generation.** A reset's key is a keyed hash of the key and the
   generation it replaces (the key service's CreationDate and LastResetDate) plus an epoch that
   advances only when the key is proved used up without a reset (a stored refusal or 5xx). A
   redelivered message, a second beat, a recovering or a paused worker, a manual run: every actor
   that rotates one generation sends the same key; the key service runs one reset and blocks the
   others (`409 idempotent_creation_conflict`, for 24 h), which then read its stored answer.
2. **Durable before the side effect.** The attempt record is written, fenced by the key's lease,
   before the reset. After the reset only the sink writes stand between the answer and safety.
3. **An answer settles only what it proves.** A 200 naming the asked key is the secret; a 4xx
   (429 included, not a 409 asking to retry) proves "did not run"; a 409 saying the key was used
   is answered by that key's stored answer (read once, never a second POST). No answer, any 5xx,
   a cut or unparsable 200, or one naming another key: *in doubt*.
4. **In doubt is settled by replay and the key's generation only.** A stored 200 is stored; a
   stored 4xx means not run (next epoch). Nothing stored, or a stored 5xx: wait until the horizon
   (the origin's request deadline) has passed since the doubt began; then an unchanged generation
   means not run, and a changed one means the secret is lost (critical event, reset afresh from
   the new generation). Not run with nothing stored sends the *same* key again (an unused key
   runs; one a late commit used draws the 409 and its answer, so even a commit later than the
   horizon, or a horizon cut short by a clock, collapses onto it); not run with a stored 5xx
   sends the next epoch's key, since the used one stays blocked for 24 h.
5. **The record ends only when every sink reads back the fingerprint** (or the token check proved
   the issued secret dead), when the service proved "not run", or when the secret is proved lost.
   A fresh reset that replaces a lost secret is the exception to "not run": refused, the loss
   still stands, so its record stays, with the next epoch's key, for the next sweep to send.
   A call the fleet's rate budget held back never went: a first attempt's record is deleted (the
   key is deferred); any other waits in doubt, its key unsent, for the next sweep.
6. **Fenced.** Every record write and delete checks the lease; a lost lease aborts before the next
   side effect.
7. **A create is a reset of the lineage.** The overlap strategy's create of a successor key goes
   through the same phases, with its own Idempotency-Key per generation of the key it replaces;
   the lineage's generation is the successor's once one exists (so a successor that nobody holds
   after the horizon is a lost create: it is revoked and the next epoch creates again).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from rotator.domain import Generation, KeyRef, Replay

#: The contract's in-doubt horizon: the origin's own request deadline (60 s) plus slack for our
#: request's time in flight. Judged on the state store's clock, shared by every worker.
DEFAULT_HORIZON_S: Final = 90.0
#: Idempotency-Keys one generation of a key may use up (refused, spent, or forced past a stored
#: rotation; counted in the state store for two days). Recovery without it reads them in order,
#: past every refused or spent one, so every key in use is found.
MAX_EPOCHS: Final = 64


class Phase(enum.StrEnum):
    IDLE = "idle"  # no record
    RESETTING = "resetting"  # record written; the reset is on its way (found after a crash: in doubt)
    IN_DOUBT = "in_doubt"  # the reset may or may not have run
    STORING = "storing"  # the answer came; not every sink reads it back yet
    DONE = "done"  # every sink reads back the fingerprint; record deleted


class Step(enum.StrEnum):
    """What the engine observed; the input of a transition."""

    START = "start"  # the key is due (or forced) and every sink is prepared
    ANSWERED = "answered"  # a reset or replay answered 200 for this key and generation
    REFUSED = "refused"  # a 4xx from the service (or a stored one): the reset did not run
    NO_ANSWER = "no_answer"  # time-out, 5xx, cut or unparsable 200, another key named, replay failed
    NOT_RUN = "not_run"  # nothing stored, generation unchanged, horizon passed
    SPENT = "spent"  # a stored 5xx (the key is used up), generation unchanged, horizon passed
    LOST = "lost"  # nothing to replay, generation changed, horizon passed
    STILL_LOST = "still_lost"  # a refusal (or a stored one) of the fresh reset that replaces a lost secret
    DEFERRED = "deferred"  # the rate budget held a first attempt's call back before it went: nothing ran
    HELD = "held"  # ... the call of an attempt that was in doubt or replaces a lost secret
    STORED = "stored"  # every sink reads back the fingerprint, or the secret is proved dead
    NOT_STORED = "not_stored"  # a sink failed or read back another fingerprint


@dataclass(frozen=True, slots=True)
class Transition:
    to: Phase
    durable: str  # the state write (or event) that must succeed before the next side effect


P, S = Phase, Step
#: The whole protocol. A pair not listed is a protocol violation (the engine keeps the record and
#: raises a critical event). docs/protocol.md draws its diagram from this table.
TRANSITIONS: Final[dict[tuple[Phase, Step], Transition]] = {
    (P.IDLE, S.START): Transition(P.RESETTING, "save record (idempotency key, generation, epoch)"),
    (P.RESETTING, S.ANSWERED): Transition(P.STORING, "none: the sink writes come first"),
    (P.RESETTING, S.REFUSED): Transition(P.IDLE, "advance the epoch, delete record"),
    (P.RESETTING, S.NO_ANSWER): Transition(P.IN_DOUBT, "save record (in doubt since now)"),
    (P.IN_DOUBT, S.ANSWERED): Transition(P.STORING, "none: the sink writes come first"),
    (P.IN_DOUBT, S.REFUSED): Transition(P.IDLE, "advance the epoch, delete record"),
    (P.IN_DOUBT, S.NO_ANSWER): Transition(P.IN_DOUBT, "none: the record stays"),
    (P.IN_DOUBT, S.NOT_RUN): Transition(P.RESETTING, "save record (the same idempotency key), send it again"),
    (P.IN_DOUBT, S.SPENT): Transition(P.RESETTING, "advance the epoch, save record (the next epoch's key), send it"),
    (P.IN_DOUBT, S.LOST): Transition(P.IDLE, "critical event; the record stays until a fresh attempt's replaces it"),
    (P.RESETTING, S.STILL_LOST): Transition(P.IN_DOUBT, "advance the epoch, save record (the next epoch's key, "
                                                         "unsent), critical event; the next sweep sends it"),
    (P.IN_DOUBT, S.STILL_LOST): Transition(P.IN_DOUBT, "advance the epoch, save record (the next epoch's key, "
                                                        "unsent), critical event; the next sweep sends it"),
    (P.RESETTING, S.DEFERRED): Transition(P.IDLE, "delete record (its key was never sent; the epoch stays)"),
    (P.RESETTING, S.HELD): Transition(P.IN_DOUBT, "save record (in doubt, its key unsent); the next sweep "
                                                   "sends it"),
    (P.STORING, S.STORED): Transition(P.DONE, "delete record (fenced), then history"),
    (P.STORING, S.NOT_STORED): Transition(P.STORING, "critical event, then save record (storing)"),
    (P.STORING, S.ANSWERED): Transition(P.STORING, "none: the sink writes come first"),
    (P.STORING, S.NO_ANSWER): Transition(P.STORING, "none: the record stays"),
    (P.STORING, S.LOST): Transition(P.IDLE, "critical event; the record stays until a fresh attempt's replaces it"),
}


class ProtocolViolation(Exception):
    """A step that the protocol does not allow in this phase."""


def advance(phase: Phase, step: Step) -> Transition:
    try:
        return TRANSITIONS[(phase, step)]
    except KeyError:
        raise ProtocolViolation(f"{step.value} is not allowed while {phase.value}") from None


def refusal(after_loss: bool) -> Step:
    """A 4xx, answered or stored: the call did not run. That ends an attempt, unless the attempt
    replaces a secret proved lost: then the loss stands, and so does the attempt."""
    return Step.STILL_LOST if after_loss else Step.REFUSED


def deferral(first: bool) -> Step:
    """The rate budget held the call back before it went, so nothing ran under its key. A first
    attempt ends as if it had never started; one that was in doubt, or that replaces a lost
    secret, must not be forgotten: it waits in doubt for the next sweep, which sends its key."""
    return Step.DEFERRED if first else Step.HELD


def judge(phase: Phase, replaced: Generation | None, now: Generation, replay: Replay,
          answered: Generation | None, waited_s: float, horizon_s: float, after_loss: bool = False) -> Step:
    """Settle an attempt found in `phase` from the key's generation `now` and a replay.

    `replaced` is the generation the attempt set out to replace (None for a record of the first
    protocol); `answered` the generation a stored 200 names; `waited_s` the time since the doubt
    began, on the state store's clock; `after_loss`: the attempt replaces a lost secret.
    """
    if replay is Replay.ANSWER and answered is not None:
        if answered == now:
            return Step.ANSWERED
        # The key moved past the stored answer (reset again since): that secret is dead. A key
        # that only lags behind the answer (a stale read) is waited for.
        return Step.LOST if now > answered else Step.NO_ANSWER
    if replay is Replay.REFUSED:
        return refusal(after_loss)
    if replay not in (Replay.EMPTY, Replay.SPENT) or waited_s < horizon_s:
        return Step.NO_ANSWER
    if replay is Replay.SPENT and phase is Phase.STORING:
        return Step.SPENT  # a stored failure of a call that answered 200: no transition, kept for a person
    if phase is not Phase.STORING and replaced is not None and now == replaced:
        return Step.SPENT if replay is Replay.SPENT else Step.NOT_RUN
    return Step.LOST  # it ran (an answer came once, or the generation moved) and nothing is left


def public_name(idempotency_key: str) -> str:
    """What sinks, tags and documents name an attempt by. The Idempotency-Key itself reads the
    stored answer (the live secret) for 24 hours, so it stays in Redis and is never published."""
    return "a2-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def derivation_id(mac: bytes) -> str:
    """Names the secret Idempotency-Keys are derived with, in the attempt records, so a record
    derived with another one is never sent under a different key; says nothing about the secret."""
    return "k1-" + hmac.new(mac, b"rotator-idempotency-secret-id", hashlib.sha256).hexdigest()[:16]


def idempotency_key(mac: bytes, ref: KeyRef, replaced: Generation, epoch: int, action: str = "reset") -> str:
    """The reset's (or a successor's create's) Idempotency-Key: 35 characters of [a-z0-9-], keyed so
    nobody can predict it; a create's never equals a reset's of the same generation."""
    message = f"rotator-{action}-v2\x00{ref.client_id}\x00{ref.key_id}\x00{replaced}\x00{epoch}".encode()
    return ("c2-" if action == "create" else "r2-") + hmac.new(mac, message, hashlib.sha256).hexdigest()[:32]


def diagram() -> str:
    """The transition table as a Mermaid state diagram (docs/protocol.md embeds it verbatim)."""
    lines = ["stateDiagram-v2", "    [*] --> idle"]
    for (phase, step), transition in TRANSITIONS.items():
        lines.append(f"    {phase.value} --> {transition.to.value}: {step.value}")
    lines.append("    done --> [*]")
    return "\n".join(lines)


def table() -> str:
    """The transition table as Markdown, with the durable write each transition needs."""
    rows = ["| phase | step | next | durable before the next side effect |", "| --- | --- | --- | --- |"]
    for (phase, step), transition in TRANSITIONS.items():
        rows.append(f"| {phase.value} | {step.value} | {transition.to.value} | {transition.durable} |")
    return "\n".join(rows)
