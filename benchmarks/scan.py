"""Scan-path benchmark: rotator's scan against a bare httpx loop over the same pages.

    python3 dev.py bench scan      (or: .venv/bin/python benchmarks/scan.py [--sizes 10000,100000])

The emulator runs in its own process, seeded with N keys in 100 Client IDs. Each measured path
runs in a fresh child process, so its peak RSS is its own. Prints wall times, their ratio
(goal <= 1.1) and the scan path's peak RSS (goal <= 150 MB, flat from 10k to 100k keys).
"""

from __future__ import annotations

import argparse
import json
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


def run_size(keys: int, folder: Path) -> None:
    from rotator.embedded import free_port

    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "rotator.cli", "emulator", "--port", str(port), "--seed",
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
    finally:
        emulator.terminate()
        emulator.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--url")
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, CLIENTS)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            run_size(size, Path(tmp))


if __name__ == "__main__":
    main()
