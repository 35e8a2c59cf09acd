"""Rate-budget benchmark: real Celery workers against the emulator's published rate limits.

    python3 dev.py bench budget      (or: .venv/bin/python benchmarks/budget.py [--keys 2000])

1. **The share.** 2,000 due keys of one Client ID, the published limits with 300 calls left in
   the 15-minute window, 4 worker processes and `max_share_of_rate_limit = 0.5`: counted at the
   emulator, the fleet spends at most 150 calls (+2%) in that window and draws at most one 429;
   every key it reset is stored, the rest is deferred, and the scans after it (one each half
   window; the windows shortened, the 15-minute one to --window seconds) rotate every deferred key,
   each once. Printed as calls against the share (goal <= 1.02). With the default reserve (10% of
   2,300) the reserve binds first, at about 70 calls; `--reserve 0` shows the share binding.
2. **A paced rate.** A key service without rate-limit headers and `requests_per_second = 20`:
   the wall time of --paced-keys rotations against (requests / 20 s^-1), the baseline of the same
   run's request count (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from cryptography.fernet import Fernet

from rotator.embedded import PrivateRedis
from rotator.keyservice.emulator import RATE_WINDOWS_S, Emulator
from rotator.keyservice.emulator_http import EmulatorServer

TOKEN = "bench-token"
CLIENT = "c00"
LATENCY = 0.005


class Counter:
    """Every call the emulator's rate limit sees, refused (429) or not."""

    def __init__(self, emulator: Emulator) -> None:
        self.calls = 0
        self.refused = 0
        self._lock = threading.Lock()
        real = emulator.rate_call

        def counting(client_id: str) -> tuple[dict[str, str], int | None]:
            headers, wait = real(client_id)
            with self._lock:
                self.calls += 1
                self.refused += wait is not None
            return headers, wait

        emulator.rate_call = counting  # type: ignore[method-assign]


def fleet(home: Path, redis_url: str, url: str, processes: int, keyservice: str) -> tuple[Path, dict[str, str]]:
    config = home / "rotator.toml"
    config.write_text(f"""
[keyservice]
url = "{url}"
{keyservice}
[policy]
mode = "enforce"
[state]
redis_url = "{redis_url}/0"
history_max = 100000
[celery]
broker_url = "{redis_url}/1"
concurrency = {processes}
[[sinks]]
kind = "file"
dir = "{home / 'secrets'}"
""")
    env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": "bench-fingerprint-key-000",
           "ROTATOR_FILE_KEY": Fernet.generate_key().decode(), "ROTATOR_LOG_LEVEL": "WARNING"}
    return config, env


def enqueue(config: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "rotator.cli", "rotate", "--all-due", "--apply", "--enqueue",
                    "--config", str(config)], env=env, capture_output=True, check=False)


def rotations(db: redis.Redis) -> list[dict[str, object]]:
    return [e for e in (json.loads(x) for x in db.lrange("rotator:history", 0, -1)) if e.get("kind") == "rotation"]


def wait_until(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("benchmark: timed out")
        time.sleep(0.05)


def share_run(keys: int, processes: int, window_s: int, reserve: float) -> None:
    emulator = Emulator(token=TOKEN)
    now = emulator.now()
    emulator.add_client(CLIENT, "Bench", created_at=now - 120 * 86_400)
    for i in range(keys - 1):
        emulator.add_key(CLIENT, f"key {i}", created_at=now - 120 * 86_400)
    # The published limits; the windows shortened (the 15-minute one to --window seconds, the
    # 30-minute and hour ones in proportion) so the backlog is seen through in a few minutes.
    emulator.rate_windows_s = (window_s, 2 * window_s, 4 * window_s, RATE_WINDOWS_S[3])
    emulator.latency_s = LATENCY
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as private, EmulatorServer(emulator) as server:
        config, env = fleet(Path(tmp), private.url, server.url, processes,
                            # A hold shorter than retry_max_wait_s is waited, not deferred: the
                            # shortened window must be longer than that.
                            f"max_share_of_rate_limit = 0.5\nrate_limit_reserve = {reserve:g}\nretry_max_wait_s = 1")
        worker = subprocess.Popen([sys.executable, "-m", "rotator.cli", "worker", "--config", str(config),
                                   "--loglevel", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(6)  # worker start-up is not part of the measurement
            db = redis.Redis.from_url(private.url + "/0")
            queue = redis.Redis.from_url(private.url + "/1")
            limit = emulator.rate_limits[0] if emulator.rate_limits else 0
            emulator.spend_calls(CLIENT, limit - 300)  # the platform's payments: 300 calls left
            counter = Counter(emulator)
            started = time.monotonic()

            def drained() -> bool:
                return queue.llen("celery") == 0 and queue.hlen("unacked") == 0

            enqueue(config, env)
            wait_until(drained, 120)
            first = time.monotonic() - started
            calls, refused, reset = counter.calls, counter.refused, len(emulator.ledger)
            stored = sum(1 for e in rotations(db) if e["status"] == "succeeded")
            in_window = first < window_s
            runs = 1
            while len({e.key_id for e in emulator.ledger}) < keys and runs < 100:  # beat's next scans
                time.sleep(window_s / 2)
                enqueue(config, env)
                wait_until(drained, 120)
                runs += 1
            wall = time.monotonic() - started
            each_once = len(emulator.ledger) == keys == len({e.key_id for e in emulator.ledger})
            print(f"share: {keys} due keys, 300 calls left, share 0.5, reserve {reserve:g}, {processes} worker "
                  f"processes: {calls} calls and {refused} 429s in the first window ({first:.1f}s, "
                  f"{'inside' if in_window else 'NOT inside'} its {window_s}s); {reset} reset and {stored} stored, "
                  f"{keys - reset} deferred; then {runs - 1} more scans, one each {window_s / 2:g}s: every key "
                  f"rotated, each once: {each_once} ({wall:.0f}s, {counter.refused} 429s in all)")
            print(f"share: calls {calls} | share 150 | ratio {calls / 150:.3f} (goal <= 1.02, at most one 429: "
                  f"{refused <= 1})")
        finally:
            os.killpg(worker.pid, 15)
            worker.wait(30)


def paced_run(keys: int, processes: int, rate: float) -> None:
    emulator = Emulator(token=TOKEN)
    now = emulator.now()
    emulator.add_client(CLIENT, "Bench", created_at=now - 120 * 86_400)
    for i in range(keys - 1):
        emulator.add_key(CLIENT, f"key {i}", created_at=now - 120 * 86_400)
    emulator.rate_limits = None  # no headers: only the configured pace holds the fleet
    emulator.latency_s = LATENCY
    requests = 0
    lock = threading.Lock()
    real = emulator.take_fault

    def counting(method: str, path: str) -> object:
        nonlocal requests
        with lock:
            requests += 1
        return real(method, path)

    emulator.take_fault = counting  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as private, EmulatorServer(emulator) as server:
        config, env = fleet(Path(tmp), private.url, server.url, processes, f"requests_per_second = {rate:g}")
        worker = subprocess.Popen([sys.executable, "-m", "rotator.cli", "worker", "--config", str(config),
                                   "--loglevel", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            time.sleep(6)
            db = redis.Redis.from_url(private.url + "/0")
            requests = 0
            started = time.monotonic()
            enqueue(config, env)
            wait_until(lambda: len(rotations(db)) >= keys, 600)
            wall = time.monotonic() - started
            ideal = requests / rate
            done = sum(1 for e in rotations(db) if e["status"] == "succeeded")
            print(f"paced: {done}/{keys} rotations at requests_per_second = {rate:g}, {processes} worker processes: "
                  f"{requests} requests in {wall:.1f}s")
            print(f"paced: wall {wall:.2f}s | requests / rate {ideal:.2f}s | ratio {wall / ideal:.3f} (goal <= 1.15)")
        finally:
            os.killpg(worker.pid, 15)
            worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--paced-keys", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--window", type=int, default=20, help="The first window's length, seconds.")
    parser.add_argument("--reserve", type=float, default=0.1, help="rate_limit_reserve (the default: 0.1).")
    parser.add_argument("--only", choices=("share", "paced"))
    args = parser.parse_args()
    if args.only != "paced":
        share_run(args.keys, args.processes, args.window, args.reserve)
    if args.only != "share":
        paced_run(args.paced_keys, args.processes, 20.0)


if __name__ == "__main__":
    main()
