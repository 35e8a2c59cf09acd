"""Two or more beats, one scheduler: real beat processes on a private Redis (state and broker),
killed (SIGKILL) and frozen (SIGSTOP); every message they publish is read off the broker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import redis

from rotator.beat import LEASE, LeaderScheduler, takeover_bound_s
from rotator.embedded import PrivateRedis
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.state import RedisState
from tests.test_celery import Cluster, wait_for

TTL_S = 5
SCAN_EVERY_S = 2


class Published:
    """Every task message on the broker's queue, with when it was first seen and who sent it."""

    def __init__(self, broker: redis.Redis, queue: str = "rotator") -> None:
        self.broker, self.queue = broker, queue
        self.seen: list[tuple[float, str, str]] = []  # (time, origin pid, task)
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            length = self.broker.llen(self.queue)
            if length > self._count:
                for raw in reversed(self.broker.lrange(self.queue, 0, length - self._count - 1)):
                    headers = json.loads(raw)["headers"]
                    origin = str(headers.get("origin", "")).split("@")[0].removeprefix("gen")
                    self.seen.append((time.monotonic(), origin, headers["task"]))
                self._count = length

    def by(self, proc: object) -> list[float]:
        return [t for t, origin, _ in list(self.seen) if origin == str(getattr(proc, "pid"))]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.mark.slow
def test_one_beat_schedules_and_another_takes_over_when_it_is_killed_or_frozen(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
) -> None:
    """Beat A leads, B waits. A is killed: B takes over. C joins; B is frozen: C takes over
    within the lease's TTL. B thaws: it rejoins as a standby, neither exiting nor scheduling.
    At no moment do two beats publish, and each interval's scan is sent about once."""
    cluster = Cluster(tmp_path, redis_server, "http://127.0.0.1:9", "http://127.0.0.1:9", "unused-token", celery=f"beat_lock_ttl_s = {TTL_S}")
    published = Published(redis.Redis.from_url(f"{redis_server}/1"))
    began = time.monotonic()
    try:
        a = cluster.start("beat", "--schedule", str(tmp_path / "beat-a"))
        wait_for(lambda: bool(published.by(a)), 30, "beat A to schedule")
        b = cluster.start("beat", "--schedule", str(tmp_path / "beat-b"))
        time.sleep(3 * SCAN_EVERY_S)
        assert published.by(b) == [] and len(published.by(a)) >= 2

        os.killpg(a.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: bool(published.by(b)), 60, "beat B to take over from a killed A")
        after_kill = published.by(b)[0] - killed

        c = cluster.start("beat", "--schedule", str(tmp_path / "beat-c"))
        time.sleep(3 * SCAN_EVERY_S)
        assert published.by(c) == []
        os.killpg(b.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        wait_for(lambda: bool(published.by(c)), 60, "beat C to take over from a frozen B")
        after_freeze = published.by(c)[0] - frozen
        from_b = len(published.by(b))
        os.killpg(b.pid, signal.SIGCONT)
        time.sleep(3 * SCAN_EVERY_S)
        assert b.poll() is None, "the thawed beat exited"
        assert len(published.by(b)) == from_b, "the thawed beat scheduled again"
        assert "beat.standby" in cluster.outputs[1].read_text()
        assert len(published.by(c)) >= 3  # C goes on leading

        origins = [origin for _, origin, _ in published.seen]
        changes = sum(1 for x, y in pairwise(origins) if x != y)
        # A ... A, B ... B, C ... C: never two at a time. (rotator.beat says a leader frozen between its
        # last check of the lease and the socket write may still send one message on waking; that
        # window is well under a millisecond in a two-second tick.)
        assert changes == 2, origins
        assert after_kill < 0.6 * TTL_S, after_kill  # same machine, gone: at once, not when the lease runs out
        assert TTL_S / 2 < after_freeze < takeover_bound_s(TTL_S) + 5, after_freeze
        scans = [t for t, _, task in published.seen if task == "rotator.scan"]
        assert len(scans) <= (time.monotonic() - began) / SCAN_EVERY_S + 3
    finally:
        published.stop()
        cluster.stop()


def test_a_redis_error_never_makes_a_leader_and_ends_one_once_its_lease_may_have_expired() -> None:
    """Taking the lease while Redis does not answer: standby. A leader whose extension fails goes
    on only while its last extension still covers it, then stands by."""
    with PrivateRedis() as server:
        def scheduler() -> LeaderScheduler:
            made: LeaderScheduler = LeaderScheduler.__new__(LeaderScheduler)
            made.ttl_s, made.lease = 2.0, None
            made.state = RedisState.from_url(server.url + "/0", "beat-test", timeout_s=0.5)
            return made

        one, two = scheduler(), scheduler()
        assert one.leading() and not two.leading()
        assert one.state.client.get(f"beat-test:lock:{LEASE}") is not None
        server.stop()
        assert one.leading()  # Redis gone a moment ago: its lease cannot have expired yet
        assert not two.leading()
        time.sleep(2.1)
        assert not one.leading() and one.lease is None
        assert not two.leading()


def test_a_leader_frozen_after_its_extension_sends_nothing_when_it_wakes() -> None:
    """The freeze falls between the lease's extension and the send: on waking, the leader's own
    clock says the lease may have run out, so the entry is not sent and the beat stands by."""
    with PrivateRedis() as server:
        leader: LeaderScheduler = LeaderScheduler.__new__(LeaderScheduler)
        leader.ttl_s, leader.lease = 0.5, None
        leader.state = RedisState.from_url(server.url + "/0", "beat-freeze", timeout_s=0.5)
        assert leader.leading()
        time.sleep(0.6)  # frozen past the lease, between `leading()` and the send
        assert leader.apply_async(object()) is None and leader.lease is None
