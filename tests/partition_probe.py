"""Run inside the services' network namespace of tests/test_partition.py (nothing there is reachable
from the test's own): set OpenBao up, inject an emulator fault, and report what the services hold.

    python -m tests.partition_probe wait
    python -m tests.partition_probe setup MOUNT            -> {"role_id", "secret_id"}
    python -m tests.partition_probe fault JSON
    python -m tests.partition_probe state CLIENT KEY MOUNT -> {"resets", "attempts", "last", "vault_versions", ...}

Services: Redis on 6379, the emulator on 8400, OpenBao on 8200 (root token in BAO_TOKEN), all on
127.0.0.1 of that namespace. It prints JSON and never a secret.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import httpx

EMULATOR = "http://127.0.0.1:8400"
BAO = "http://127.0.0.1:8200"


def _up() -> bool:
    for port in (6379, 8400, 8200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
    try:
        return bool(httpx.get(f"{BAO}/v1/sys/health", timeout=1).json().get("initialized"))
    except (httpx.HTTPError, ValueError):
        return False


def wait() -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _up():
            return {"up": True}
        time.sleep(0.2)
    return {"up": False}


def setup(mount: str) -> dict[str, Any]:
    import hvac

    from rotator.openbao import approle_login
    from tests.conftest import doc_policy

    root = hvac.Client(url=BAO, token=os.environ["BAO_TOKEN"])
    login = approle_login(root, mount=mount, policy=doc_policy(mount, "rotator"))
    return {"role_id": login.role_id, "secret_id": login.secret_id}


def fault(spec: str) -> dict[str, Any]:
    token = os.environ["ROTATOR_KEYSERVICE_TOKEN"]
    answer = httpx.post(f"{EMULATOR}/_emulator/faults", json=json.loads(spec),
                        headers={"Authorization": f"Bearer {token}"}, timeout=5)
    return {"status": answer.status_code}


def state(client_id: str, key_id: str, mount: str) -> dict[str, Any]:
    import hvac

    from rotator.domain import Secret
    from rotator.keyservice.http import HttpKeyService

    token = os.environ["ROTATOR_KEYSERVICE_TOKEN"]
    ledger = httpx.get(f"{EMULATOR}/_emulator/ledger", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    resets = [e for e in (ledger if isinstance(ledger, list) else ledger.get("ledger", []))
              if e.get("key_id") == key_id]
    import redis

    db = redis.Redis(host="127.0.0.1", port=6379, db=0)
    last = json.loads(db.get(f"rotator:last:{client_id}/{key_id}") or "null")
    held = {"resets": len(resets), "attempts": sorted(m.decode() for m in db.smembers("rotator:attempts")),
            "last": {"status": last.get("status"), "attempt_id": last.get("attempt_id")} if last else None}
    kv = hvac.Client(url=BAO, token=os.environ["BAO_TOKEN"]).secrets.kv.v2
    path = f"rotator/{client_id}/{key_id}"
    try:
        meta = kv.read_secret_metadata(path=path, mount_point=mount)["data"]
    except Exception:
        return {**held, "vault_versions": 0, "authenticates": False}
    doc = kv.read_secret_version(path=path, mount_point=mount)["data"]["data"]
    with HttpKeyService(EMULATOR, token) as service:
        works = service.verify_secret(client_id, Secret(doc["api_key"]), key_id)
    return {**held, "vault_versions": int(meta["current_version"]), "authenticates": works,
            "attempt_id": doc.get("attempt_id"), "key_reset_at": doc.get("key_reset_at")}


def main() -> None:
    command, *args = sys.argv[1:]
    result = {"wait": wait, "setup": setup, "fault": fault, "state": state}[command](*args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
