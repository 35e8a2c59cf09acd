"""Two or more beats, one scheduler: Celery beat's scheduler, scheduling only while it holds the
beat lease in the state Redis.

Every beat process runs this scheduler (`beat_scheduler` in rotator.celeryconf). Before each due
entry it applies, the leading beat extends its lease (a fenced `PEXPIRE` of its own token); a beat
whose extension fails, or whose lease may have expired while it was frozen (SIGSTOP, a paused VM:
its own monotonic clock says so), stops scheduling and becomes a standby, however long it was
away: it never exits and never schedules on a lease it cannot prove. A standby tries to take the
lease every `standby_poll_s`; it gets it once the leader's TTL has run out (`celery.beat_lock_ttl_s`),
or at once when the leader was a process of this machine that is gone (`RedisState.acquire`).
A Redis error never makes a leader: the leader goes on only while its last extension still
covers it, a standby stays one. A SIGTERM releases the lease, so a standby takes over at once.

Right before it sends an entry, the leader checks again, by its own clock, that its lease still
holds; what a leader frozen between that check and the socket write may still send after it wakes
(one message) is claimed once per interval by the task itself (`RedisState.once`), as every
scheduled task is, so an interval's scan, repair or reconcile runs once whatever two beats send.
"""

from __future__ import annotations

from typing import Any

import redis
from celery.beat import PersistentScheduler

from rotator import logs
from rotator.state import Lease, LeaseLostError, RedisState

log = logs.get("rotator.beat")
LEASE = "beat-leader"


def standby_poll_s(ttl_s: float) -> float:
    """How often a standby asks for the lease: a sixth of its TTL, at most 5 s."""
    return min(5.0, ttl_s / 6)


def takeover_bound_s(ttl_s: float) -> float:
    """The longest a frozen or unreachable leader keeps the others waiting (docs/operations.md)."""
    return ttl_s + standby_poll_s(ttl_s)


class LeaderScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler (its schedule file), gated by the beat lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from rotator.config import process_settings
        from rotator.runtime import build_state

        settings = process_settings()
        self.ttl_s = float(settings.celery.beat_lock_ttl_s)
        self.state: RedisState = build_state(settings, timeout_s=max(1.0, self.ttl_s / 6))
        self.lease: Lease | None = None
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.leading():
            return standby_poll_s(self.ttl_s)
        return float(min(super().tick(*args, **kwargs), self.ttl_s / 3))

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        """Send a due entry only while the lease still surely holds by this process's own clock
        (no Redis call): a beat frozen after its extension, for longer than the lease, sends
        nothing when it wakes. What is left is a freeze between this check and the socket write."""
        lease = self.lease
        try:
            if lease is None:
                raise LeaseLostError("no lease")
            lease.check()
        except LeaseLostError:
            self.lease = None
            log.warning("beat.standby", reason="its lease may have expired before this entry was sent")
            return None
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)

    def leading(self) -> bool:
        """Whether this beat may apply the next due entry now (taking the lease if it is free)."""
        lease = self.lease
        if lease is not None:
            try:
                if lease.extend():
                    return True
                reason = "its lease was taken over or expired"
            except redis.RedisError as exc:
                try:
                    lease.check()  # the last extension still covers it: nobody else can hold the lease
                    return True
                except Exception:
                    reason = f"the state store does not answer ({type(exc).__name__}) and the lease may have expired"
            self.lease = None
            log.warning("beat.standby", reason=reason)
            return False
        try:
            self.lease = self.state.acquire(LEASE, self.ttl_s)
        except redis.RedisError as exc:
            log.debug("beat.no_lease", error_type=type(exc).__name__)
            return False
        if self.lease is None:
            return False
        log.info("beat.leading", lease_ttl_s=self.ttl_s)
        return True

    def close(self) -> None:
        """On shutdown: give the lease back, so a standby takes over at once."""
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                lease.release()
            except redis.RedisError as exc:
                log.warning("beat.lease_not_released", error_type=type(exc).__name__)
        super().close()
