"""Secret-in-memory window benchmark: how many sink round trips stand between the reset's answer
and the last sink's acknowledgement.

    python3 dev.py bench window      (or: .venv/bin/python benchmarks/window.py [--keys 200])

A real engine rotates due keys through the emulator over HTTP into a Vault KV v2 server over HTTP
whose every request takes `--latency-ms` (a network round trip). The window is measured in the
engine (reset answered -> every sink acknowledged) and the Vault requests inside it are counted.
Baselines measured in the same run: one bare CAS write of a document of the same size (one round
trip), and the write path of the first protocol (read metadata, read the current version, CAS
write, write metadata: four round trips, all after the reset).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rotator.domain import KeyRef
from rotator.embedded import PrivateRedis
from rotator.engine import Engine, sinkio
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.protocols import SecretRecord
from rotator.sinks import registry
from rotator.state import RedisState
from tests.vault_server import VaultTestServer

FP = Fingerprinter("benchmark-fingerprint-key-0000")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    args = parser.parse_args()
    import os

    from rotator import logs

    logs.configure("ERROR")
    emulator = Emulator(token="bench")
    emulator.rate_limits = None  # the rate budget is not what this measures
    now = emulator.now()
    emulator.add_client("bench", created_at=now - 400 * 86_400, auto_key=False)
    ids = [emulator.add_key("bench", f"key {i}", created_at=now - 400 * 86_400).id for i in range(args.keys)]
    with EmulatorServer(emulator) as server, VaultTestServer() as vault, PrivateRedis() as redis_server:
        os.environ["VAULT_TOKEN"] = vault.root_token
        vault.state.latency_s = args.latency_ms / 1000
        sink: Any = registry.build("vault", {"url": vault.url}, FP)
        keyservice = HttpKeyService(server.url, "bench")
        state = RedisState.from_url(redis_server.url + "/0")
        engine = Engine(keyservice, [sink], state, CapturePublisher(), FP, Policy(), verify=False)
        in_window: list[int] = []
        write_everywhere = sinkio.write_everywhere

        def counted(ctx: Any, record: SecretRecord, prepared: dict[int, object]) -> Any:
            before = len(vault.state.requests)
            try:
                return write_everywhere(ctx, record, prepared)
            finally:
                in_window.append(len(vault.state.requests) - before)

        sinkio.write_everywhere = counted  # type: ignore[assignment]
        windows = []
        for key_id in ids:
            result = engine.rotate(KeyRef("bench", key_id), trigger="bench")
            assert result.status == "succeeded", result.reason
            windows.append(result.timings["secret_window_s"])
        # Baselines, same server, same latency, same document size.
        key = keyservice.get_key("bench", ids[0])
        issued = keyservice.reset_key("bench", ids[0], "bench-baseline-0000001")
        record = SecretRecord(issued.key, issued.secret, "bench-baseline-0000001", FP(issued.secret),
                              float(issued.key.born_at))
        kv = sink._kv()
        path = f"rotator/bench/{ids[0]}"
        bare, first_protocol = [], []
        for _ in range(50):
            version = int(kv.read_secret_metadata(path=path, mount_point="secret")["data"]["current_version"])
            started = time.perf_counter()
            kv.create_or_update_secret(path=path, secret={"api_key": "x" * 60, "rotated_at": key.key_id},
                                       cas=version, mount_point="secret")
            bare.append(time.perf_counter() - started)
        for i in range(50):
            moved = type(key)(key.client_id, key.key_id, key.alias, key.environment, key.scopes, key.created_at,
                              issued.key.born_at + 10 + i)
            later = SecretRecord(moved, issued.secret, f"bench-old-path-{i:06d}", record.fingerprint,
                                 float(moved.born_at))
            started = time.perf_counter()
            sink.write(later)  # metadata read, current version read, CAS write
            sink.annotate(later)  # metadata write: the first protocol did this before acknowledging
            first_protocol.append(time.perf_counter() - started)
        window = statistics.median(windows)
        one = statistics.median(bare)
        old = statistics.median(first_protocol)
        print(f"{len(ids)} rotations into Vault at {args.latency_ms:g} ms per request")
        print(f"secret window median {window * 1000:.2f} ms, {statistics.median(in_window):g} Vault round trip(s) "
              f"inside it (min {min(in_window)}, max {max(in_window)})")
        print(f"one bare CAS write {one * 1000:.2f} ms | ratio window / one write {window / one:.3f} (goal ~1)")
        print(f"first protocol's write path {old * 1000:.2f} ms (4 round trips) | "
              f"ratio window / that {window / old:.3f}")


if __name__ == "__main__":
    main()
