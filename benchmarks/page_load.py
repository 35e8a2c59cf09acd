"""Status-page benchmark: the fleet view's latency idle, beside 1,100 idle sockets, and under a
flood of key pages.

    python3 dev.py bench page_load      (or: .venv/bin/python benchmarks/page_load.py [--keys 200])

`rotator web` runs in its own process under a 1,024-descriptor limit (a systemd service's
default), live against the emulator (20 ms a call) with no snapshot cache, so every request of
`/api/status` is a fresh report. Prints the median latency of each case and its ratio to the idle
one measured in the same run (goals: under 1 s beside the idle sockets; at most 2x under the flood).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from rotator.embedded import PrivateRedis, free_port

TOKEN = "bench-token"
LATENCY = 0.020
SAMPLES = 15
IDLE_SOCKETS = 1100
FLOODERS = 60


def median_latency(url: str, samples: int = SAMPLES) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(samples):
            started = time.perf_counter()
            client.get(url).raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"{url} did not start") from None
            time.sleep(0.1)


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=200)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, IDLE_SOCKETS + 512)), hard))
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as private:
        home = Path(tmp)
        seed = {"token": TOKEN, "clients": [{"client_id": "acme", "keys": [
            {"id": f"k{i:04d}", "alias": f"key {i}", "auto_generated": i == 0, "created_days_ago": 30 + i % 90}
            for i in range(args.keys)]}]}
        (home / "seed.json").write_text(json.dumps(seed))
        ks_port, web_port = free_port(), free_port()
        env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": "bench-fingerprint-key-000",
               "ROTATOR_LOG_LEVEL": "WARNING"}
        procs = [subprocess.Popen([sys.executable, "-m", "rotator.cli", "emulator",
                                   "--rate-limits", "off", "--port", str(ks_port), "--seed",
                                   str(home / "seed.json"), "--token", TOKEN], env=env, stderr=subprocess.DEVNULL)]
        config = home / "rotator.toml"
        config.write_text(f"""
[keyservice]
url = "http://127.0.0.1:{ks_port}"
[state]
redis_url = "{private.url}/0"
[celery]
broker_url = "{private.url}/1"
[web]
cache_s = 0
[[sinks]]
kind = "memory"
""")
        sockets: list[socket.socket] = []
        try:
            wait_up(f"http://127.0.0.1:{ks_port}/_emulator/ledger", procs[0])  # any answer: it is up
            httpx.post(f"http://127.0.0.1:{ks_port}/_emulator/latency", json={"latency_s": LATENCY},
                       headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
            procs.append(subprocess.Popen([sys.executable, "-m", "rotator.cli", "web", "--port", str(web_port),
                                           "--config", str(config)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, preexec_fn=limited))
            base = f"http://127.0.0.1:{web_port}"
            wait_up(base + "/healthz", procs[1])
            fleet = base + "/api/status"
            median_latency(fleet, 3)  # warm
            idle = median_latency(fleet)

            for _ in range(IDLE_SOCKETS):
                sock = socket.create_connection(("127.0.0.1", web_port), timeout=10)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sockets.append(sock)
            beside_idle = median_latency(fleet)
            for sock in sockets:
                sock.close()
            sockets.clear()

            stop = threading.Event()
            answers = {"ok": 0, "busy": 0}

            def flood(n: int) -> None:
                with httpx.Client(timeout=60) as client:
                    while not stop.is_set():
                        status = client.get(f"{base}/api/keys/acme/k{n % args.keys:04d}").status_code
                        answers["ok" if status == 200 else "busy"] += 1

            threads = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(FLOODERS)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            flooded = median_latency(fleet)
            stop.set()
            for thread in threads:
                thread.join(60)
            print(f"fleet view (/api/status, {args.keys} keys, {LATENCY * 1000:.0f} ms a key-service call), "
                  f"median of {SAMPLES}:")
            print(f"  idle                        {idle * 1000:8.1f} ms")
            print(f"  beside {IDLE_SOCKETS} idle sockets    {beside_idle * 1000:8.1f} ms | ratio "
                  f"{beside_idle / idle:.2f} (goal < 1 s)")
            print(f"  under {FLOODERS} key-page clients  {flooded * 1000:8.1f} ms | ratio {flooded / idle:.2f} "
                  f"(goal <= 2) | key pages answered {answers['ok']}, refused busy {answers['busy']}")
        finally:
            for sock in sockets:
                sock.close()
            for proc in procs:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
