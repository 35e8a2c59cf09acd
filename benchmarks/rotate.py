"""Rotation benchmark: 1,000 due keys through real Celery workers, 20 ms of key-service latency.

    python3 dev.py bench rotate      (or: .venv/bin/python benchmarks/rotate.py [--keys 1000])

Prints the wall time against the ideal (keys x key-service round trips x latency / processes;
goal ratio <= 1.2), and the secret-in-memory window per rotation (reset answer -> last sink
acknowledged) against the sinks' own write time (goal ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from cryptography.fernet import Fernet

from rotator.embedded import PrivateRedis, free_port

TOKEN = "bench-token"
ROUND_TRIPS = 3  # get the key, reset it, prove the new secret (oauth/token)
LATENCY = 0.020


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as private:
        home = Path(tmp)
        seed = {"token": TOKEN, "clients": [{"client_id": f"c{c:02d}", "keys": [
            {"id": f"k{c:02d}-{i:04d}", "alias": f"key {i}", "auto_generated": i == 0, "created_days_ago": 120}
            for i in range(args.keys // 10)]} for c in range(10)]}
        (home / "seed.json").write_text(json.dumps(seed))
        port = free_port()
        env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": "bench-fingerprint-key-000",
               "ROTATOR_FILE_KEY": Fernet.generate_key().decode(), "ROTATOR_LOG_LEVEL": "WARNING"}
        emulator = subprocess.Popen([sys.executable, "-m", "rotator.cli", "emulator",
                                     "--rate-limits", "off", "--port", str(port), "--seed",
                                     str(home / "seed.json"), "--token", TOKEN], env=env, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        config = home / "rotator.toml"
        config.write_text(f"""
[keyservice]
url = "{url}"
[policy]
mode = "enforce"
[state]
redis_url = "{private.url}/0"
history_max = {args.keys * 2}
[celery]
broker_url = "{private.url}/1"
concurrency = {args.processes}
[[sinks]]
kind = "file"
dir = "{home / 'secrets'}"
""")
        worker = None
        try:
            for _ in range(100):
                try:
                    httpx.post(url + "/_emulator/latency", json={"latency_s": LATENCY},
                               headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            worker = subprocess.Popen([sys.executable, "-m", "rotator.cli", "worker", "--config", str(config),
                                       "--loglevel", "WARNING"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(6)  # worker start-up is not part of the measurement
            db = redis.Redis.from_url(private.url + "/0")
            db.delete("rotator:history")
            started = time.perf_counter()
            cpu_before = cpu_times()
            subprocess.run([sys.executable, "-m", "rotator.cli", "rotate", "--all-due", "--apply", "--enqueue",
                            "--config", str(config)], env=env, check=True, capture_output=True)
            enqueued = time.perf_counter() - started
            while db.llen("rotator:history") < args.keys + 1:  # + the enqueue audit entry
                time.sleep(0.05)
            wall = time.perf_counter() - started
            cpu_after = cpu_times()
            cpu_busy = (cpu_after[0] - cpu_before[0]) / max(1, cpu_after[1] - cpu_before[1])
            entries = [json.loads(x) for x in db.lrange("rotator:history", 0, -1)]
            rotations = [e for e in entries if e.get("kind") == "rotation"]
            ok = sum(1 for e in rotations if e["status"] == "succeeded")
            ideal = args.keys * ROUND_TRIPS * LATENCY / args.processes
            window = statistics.median(e["timings"]["secret_window_s"] for e in rotations)
            sink_time = statistics.median(e["timings"]["slowest_sink_write_s"] for e in rotations)
            per_rotation = statistics.median(e["timings"]["engine_s"] for e in rotations)
            busy = sum(e["timings"]["engine_s"] for e in rotations) / (args.processes * wall)
            print(f"{ok}/{args.keys} rotations succeeded with {args.processes} worker processes; "
                  f"enqueue took {enqueued:.2f}s; median rotation {per_rotation * 1000:.1f} ms in the engine "
                  f"(lease to history); processes busy in the engine {busy:.0%} of the wall time; "
                  f"machine CPU {cpu_busy:.0%} busy ({os.cpu_count()} cores)")
            print(f"wall {wall:.2f}s (includes listing the keys and enqueueing) | ideal {ideal:.2f}s | "
                  f"ratio {wall / ideal:.3f} (goal <= 1.2)")
            print(f"secret window median {window * 1000:.2f} ms | sink write median {sink_time * 1000:.2f} ms | "
                  f"ratio {window / sink_time:.3f} (goal <= 1.05)")
        finally:
            if worker is not None:
                os.killpg(worker.pid, 15)
                worker.wait(30)
            emulator.terminate()
            emulator.wait(10)


if __name__ == "__main__":
    main()
