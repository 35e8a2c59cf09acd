"""Scan benchmark: rotator's scan against a bare httpx loop over the same pages.

    python3 dev.py bench scan      (or: .venv/bin/python benchmarks/scan.py [--sizes 10000,100000])

The emulator runs in its own process, seeded with N keys in 100 Client IDs. Two comparisons:

- in-process: the scan path against the loop, each in a fresh child process (timed inside it), so
  its peak RSS is its own (goal <= 150 MB, flat from 10k to 100k keys);
- whole process (at `--whole`, 20,000 keys): the `rotator scan --json` command, start-up, config,
  imports and output included, against `python -c <the loop>` doing the same requests and what
  the rate budget needs of Redis here (the emulator publishes no rate limits, so the budget is
  asked once per Client ID, then not again within a second: one round trip per listing); and the
  import time of each.

Prints wall times and their ratios (goal <= 1.1 for both), best of several interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "bench-token"
CLIENTS = 100
REPEATS = 3
WHOLE_REPEATS = 5
SCAN_IMPORTS = "rotator.cli, rotator.runtime, rotator.keyservice.http"  # what `rotator scan` imports
BARE_IMPORTS = "import httpx, redis; httpx.Client()"  # httpx imports its transport (httpcore) with its first client
BARE_LOOP = """
import sys, httpx, redis
url, token, clients, redis_url = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
budget = redis.Redis.from_url(redis_url)
count = 0
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
    for c in range(clients):
        budget.incr(f"bench:budget:c{c:03d}")
        page = 1
        while True:
            r = http.get(f"/v2.01/c{c:03d}/apikeys", params={"page": page, "per_page": 100})
            count += len(r.json())
            if page >= int(r.headers["X-Number-Of-Pages"]):
                break
            page += 1
print(count)
"""


def child(mode: str, url: str, clients: int) -> None:
    """Run one path once and print its wall time and peak RSS as JSON."""
    from rotator.keyservice.http import HttpKeyService
    from rotator.policy import Policy
    from rotator.scan import scan

    start = time.perf_counter()
    count = 0
    if mode == "bare":
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for c in range(clients):
                page = 1
                while True:
                    r = http.get(f"/v2.01/c{c:03d}/apikeys", params={"page": page, "per_page": 100})
                    rows = r.json()
                    count += len(rows)
                    if page >= int(r.headers["X-Number-Of-Pages"]):
                        break
                    page += 1
    else:
        with HttpKeyService(url, TOKEN, per_page=100) as service:
            for _row in scan(service, Policy(), time.time()):
                count += 1
    elapsed = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    print(json.dumps({"seconds": elapsed, "rss_mb": rss_mb, "keys": count}))


def peak_rss_mb() -> float:
    """This process's own peak RSS. (ru_maxrss would include the parent's pages at fork time,
    since Linux keeps it across exec.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_file(keys: int, folder: Path) -> Path:
    per_client = keys // CLIENTS
    seed = {"token": TOKEN, "clients": [
        {"client_id": f"c{c:03d}", "keys": [
            {"id": f"k{c:03d}-{i:05d}", "alias": f"key {i}", "auto_generated": i == 0,
             "created_days_ago": (i * 7) % 200} for i in range(per_client)]}
        for c in range(CLIENTS)]}
    path = folder / f"seed-{keys}.json"
    path.write_text(json.dumps(seed))
    return path


def measure(mode: str, url: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--url", url],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def whole_processes(keys: int, url: str, folder: Path) -> None:
    """`rotator scan --json` as an operator runs it, against the bare loop as a process of its own."""
    from rotator.embedded import PrivateRedis

    with PrivateRedis() as private:
        config = folder / "rotator.toml"
        config.write_text(f'[keyservice]\nurl = "{url}"\nper_page = 100\n[state]\nredis_url = "{private.url}/0"\n'
                          '[[sinks]]\nkind = "memory"\n')
        compare(keys, url, config, f"{private.url}/0")


def compare(keys: int, url: str, config: Path, redis_url: str) -> None:
    env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": "bench-fingerprint-key"}
    rotator = [str(Path(sys.executable).with_name("rotator")), "scan", "--json", "--config", str(config)]
    bare = [sys.executable, "-c", BARE_LOOP, url, TOKEN, str(CLIENTS), redis_url]

    def timed(argv: list[str]) -> tuple[float, bytes]:
        start = time.perf_counter()
        out = subprocess.run(argv, env=env, capture_output=True, check=True).stdout
        return time.perf_counter() - start, out

    bare_s, rot_s = [], []
    for _ in range(WHOLE_REPEATS):
        seconds, out = timed(bare)
        assert int(out) == keys
        bare_s.append(seconds)
        seconds, out = timed(rotator)
        assert len(json.loads(out)) == keys, "the command must print every key"
        rot_s.append(seconds)
    b, s = min(bare_s), min(rot_s)
    print(f"{keys:>7} keys | whole process: bare loop {b:6.3f}s | rotator scan --json {s:6.3f}s | "
          f"ratio {s / b:5.3f} (goal <= 1.1)", flush=True)
    bare_imports, rotator_imports = (
        min(timed([sys.executable, "-c", code])[0] for _ in range(WHOLE_REPEATS))
        for code in (BARE_IMPORTS, f"import {SCAN_IMPORTS}"))
    print(f"{'':>7}      | imports: the loop's {bare_imports:6.3f}s | rotator scan's {rotator_imports:6.3f}s "
          f"(a process that only imports them, Python's start-up included)", flush=True)


def run_size(keys: int, folder: Path, whole: bool = False) -> None:
    from rotator.embedded import free_port

    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "rotator.cli", "emulator", "--rate-limits", "off", "--port", str(port), "--seed",
         str(seed_file(keys, folder)), "--token", TOKEN],
        stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/v2.01/clients", headers={"Authorization": f"Bearer {TOKEN}"})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        bare, rot = [], []
        for _ in range(REPEATS):  # interleaved, best of N, so drift hits both paths alike
            bare.append(measure("bare", url))
            rot.append(measure("scan", url))
        b = min(r["seconds"] for r in bare)
        s = min(r["seconds"] for r in rot)
        assert all(r["keys"] == keys for r in bare + rot), "both paths must see every key"
        print(f"{keys:>7} keys | bare httpx {b:6.3f}s | rotator scan {s:6.3f}s | ratio {s / b:5.3f} "
              f"(goal <= 1.1) | scan peak RSS {max(r['rss_mb'] for r in rot):6.1f} MB "
              f"(bare {max(r['rss_mb'] for r in bare):.1f} MB; goal <= 150)", flush=True)
        if whole:
            whole_processes(keys, url, folder)
    finally:
        emulator.terminate()
        emulator.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--url")
    parser.add_argument("--sizes", default="10000,20000,100000")
    parser.add_argument("--whole", type=int, default=20000, help="Size of the whole-process comparison.")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, CLIENTS)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            run_size(size, Path(tmp), whole=size == args.whole)


if __name__ == "__main__":
    main()
