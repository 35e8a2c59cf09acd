"""Beat takeover benchmark: how long the fleet goes without a scheduler when its leading beat dies
or freezes, with the default lease (`celery.beat_lock_ttl_s`, 30 s).

    python3 dev.py bench takeover      (or: .venv/bin/python benchmarks/takeover.py [--ttl 30])

Real `rotator beat` processes on a private Redis (state and broker). Every message they publish
is read off the broker's queue; a takeover is the time from the signal to the standby's first
message. Three cases: the leader stopped (SIGTERM: it gives the lease back), killed (SIGKILL, on
the standby's machine: its lease is taken over at once) and frozen (SIGSTOP: a paused VM, or a
leader on another machine that died: the lease must run out). Printed against the baseline
measured in the same run (one beat's own start to its first message) and against the goal (60 s).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from rotator.beat import takeover_bound_s
from rotator.embedded import PrivateRedis
from tests.test_two_beats import Published

GOAL_S = 60.0


def start(home: Path, config: Path, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": "bench", "ROTATOR_FINGERPRINT_KEY": "bench-fingerprint-key-00000",
           "ROTATOR_FILE_KEY": "x" * 44}
    return subprocess.Popen([sys.executable, "-m", "rotator.cli", "beat", "--config", str(config), "--schedule",
                             str(home / f"beat-{name}")], env=env, cwd=home, stdout=(home / f"{name}.log").open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def first_by(published: Published, proc: subprocess.Popen[bytes], after: float, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = [t for t in published.by(proc) if t >= after]
        if seen:
            return seen[0] - after
        time.sleep(0.02)
    raise SystemExit(f"no message from beat {proc.pid} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ttl", type=int, default=30, help="celery.beat_lock_ttl_s")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as server:
        home = Path(tmp)
        os.chmod(home, 0o700)
        config = home / "rotator.toml"
        config.write_text(f'[keyservice]\nurl = "http://127.0.0.1:9"\n[state]\nredis_url = "{server.url}/0"\n'
                          f'[celery]\nbroker_url = "{server.url}/1"\nscan_every_s = 1\n'
                          f'beat_lock_ttl_s = {args.ttl}\n[[sinks]]\nkind = "memory"\n')
        published = Published(redis.Redis.from_url(f"{server.url}/1"))
        try:
            began = time.monotonic()
            leader = start(home, config, "first")
            procs.append(leader)
            baseline = first_by(published, leader, began, 60)
            results: list[tuple[str, float]] = []
            for case, sig in (("stopped (SIGTERM)", signal.SIGTERM), ("killed here (SIGKILL)", signal.SIGKILL),
                              ("frozen (SIGSTOP)", signal.SIGSTOP)):
                standby = start(home, config, f"standby-{len(procs)}")
                procs.append(standby)
                time.sleep(5)  # started, standing by
                if published.by(standby):
                    raise SystemExit("a standby published while the leader led")
                sent = time.monotonic()
                os.killpg(leader.pid, sig)
                results.append((case, first_by(published, standby, sent, 3 * args.ttl + 30)))
                leader = standby
        finally:
            published.stop()
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
    print(f"beat lease TTL {args.ttl} s; documented bound {takeover_bound_s(args.ttl):.1f} s; goal {GOAL_S:.0f} s")
    print(f"baseline: one beat's start to its first message: {baseline:.2f} s")
    for case, took in results:
        print(f"  {case:<24} takeover {took:6.2f} s  = {took / baseline:5.1f}x baseline, "
              f"{took / GOAL_S:.2f}x goal")


if __name__ == "__main__":
    main()
