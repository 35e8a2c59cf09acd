"""The tamper-evident audit trail against a real Redis and the real CLI: chained writes from
several writers at once, exports with a signed checkpoint, and each kind of tampering named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from rotator.audit import GENESIS, AuditError, Checkpoint, chained, link, open_note, verify
from rotator.signing import public_text, write_private_key
from rotator.state import RedisState
from tests.conftest import FP_KEY, TOKEN, write_config


class Trail:
    """A namespace of its own in the private Redis, a config for the CLI, and its own signing key."""

    def __init__(self, tmp: Path, redis_url: str, *, history_max: int = 1000, hmac_key: bytes | None = None) -> None:
        self.tmp = tmp
        self.ns = f"audit-{uuid.uuid4().hex[:8]}"
        self.key_file = tmp / "signer.ed25519"
        self.public = public_text(write_private_key(self.key_file).public_key())
        extra = f'namespace = "{self.ns}"\nhistory_max = {history_max}\n'
        audit = ""
        if hmac_key is not None:
            (tmp / "audit.key").write_bytes(hmac_key)
            (tmp / "audit.key").chmod(0o600)
            audit = f'[audit]\nhmac_key_file = "{tmp / "audit.key"}"\n'
        self.config = write_config(tmp / "rotator.toml", "http://127.0.0.1:9", redis_url)
        text = self.config.read_text().replace("[state]\n", "[state]\n" + extra)
        self.config.write_text(text + f'[signing]\nname = "auditor"\nprivate_key_file = "{self.key_file}"\n'
                               + audit)
        self.state = RedisState.from_url(f"{redis_url}/0", self.ns, history_max, audit_key=hmac_key)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY}
        return subprocess.run([sys.executable, "-m", "rotator.cli", "audit", *args, "--config", str(self.config)],
                              env=env, capture_output=True, text=True, timeout=60)

    def export(self, name: str, *more: str) -> Path:
        path = self.tmp / name
        done = self.cli("export", "--output", str(path), *more)
        assert done.returncode == 0, done.stderr
        return path

    def verify(self, path: Path, *more: str) -> subprocess.CompletedProcess[str]:
        return self.cli("verify", str(path), *more)

    def rewrite(self, stored: list[dict[str, Any]], prev: str,
                edit: Callable[[int, dict[str, Any]], dict[str, Any]]) -> None:
        """What whoever can write Redis but lacks the HMAC key can do: edit `stored` (oldest first),
        recompute the chain without a key from `prev`, and put it in place of the history and its head."""
        forged = []
        for i, old in enumerate(stored):
            body = edit(i, {k: v for k, v in old.items() if k not in ("seq", "prev", "alg", "hash")})
            forged.append(chained(body, old["seq"], prev))
            prev = forged[-1]["hash"]
        pipe = self.state.client.pipeline()
        pipe.delete(f"{self.ns}:history")
        pipe.lpush(f"{self.ns}:history", *[json.dumps(e) for e in forged])
        pipe.set(f"{self.ns}:history:head", f"{forged[-1]['seq']}:{prev}:sha256")
        pipe.execute()


def entry(i: int) -> dict[str, Any]:
    return {"kind": "rotation", "time": 1_796_000_000.5 + i, "client_id": "acme", "key_id": f"k{i % 3}",
            "status": "succeeded", "reason": "é ünïcode and \u2028 a separator", "timings": {"total_s": 0.25 * i}}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_writers_at_once_make_one_chain_and_an_intact_export_verifies(tmp_path: Path, redis_server: str) -> None:
    trail = Trail(tmp_path, redis_server)
    writers = [RedisState.from_url(f"{redis_server}/0", trail.ns) for _ in range(4)]  # four processes' views
    threads = [threading.Thread(target=lambda w=w, n=n: [w.record(entry(25 * n + i)) for i in range(25)])
               for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = trail.state.history(limit=1000)
    assert sorted(h["seq"] for h in history) == list(range(1, 101))
    assert [h["seq"] for h in history] == list(range(100, 0, -1))  # the list's order is the chain's order
    assert trail.state.client.hget(f"{trail.ns}:metrics:rotations", "succeeded") == "100"  # counters kept

    path = trail.export("one.jsonl")
    done = trail.verify(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "intact: 100 entries (seq 1 to 100), checkpoint signed by auditor"
    as_json = json.loads(trail.verify(path, "--json").stdout)
    assert as_json["intact"] and as_json["entries"] == 100 and as_json["head"] == history[0]["hash"]
    outsider = subprocess.run([sys.executable, "-m", "rotator.cli", "audit", "verify", str(path), "--public-key",
                               f"auditor={trail.public}"], capture_output=True, text=True, timeout=60)
    assert outsider.returncode == 0, outsider.stderr  # a verifier with the public key only, no configuration


@pytest.mark.parametrize(("tamper", "named"), [
    ("edit", "line 3 (seq 3): edited"),
    ("delete", "line 3 (seq 4): deleted entries before it (seq 3 to 3 are missing)"),
    ("reorder", "line 3 (seq 4): reordered (seq 3, which belongs before it, is at line 6)"),
    ("swap", "line 3 (seq 4): reordered (seq 3, which belongs before it, is at line 4)"),
    ("insert", "line 4 (seq 3): seq 3 twice (lines 3 and 4): one of them was inserted"),
    ("cut-end", "deleted entries at the end: the file ends at seq 5, the checkpoint counts 6"),
    ("cut-start", "line 1 (seq 3): entries deleted from the start (the checkpoint says the export starts at seq 1)"),
    ("cut-all", "every entry deleted: the checkpoint says the export starts at seq 1"),
    ("forge-checkpoint", "the checkpoint is not signed by a trusted key"),
])
def test_each_kind_of_tampering_is_named_at_the_first_bad_entry(
    tmp_path: Path, redis_server: str, tamper: str, named: str
) -> None:
    trail = Trail(tmp_path, redis_server)
    for i in range(6):
        trail.state.record(entry(i))
    path = trail.export("export.jsonl")
    rows = lines(path)
    entries, note = rows[:-1], rows[-1]
    if tamper == "edit":
        changed = json.loads(entries[2]) | {"status": "failed"}
        entries[2] = json.dumps(changed)
    elif tamper == "delete":
        del entries[2]
    elif tamper == "reorder":  # the third entry moved to the end
        entries.append(entries.pop(2))
    elif tamper == "swap":
        entries[2], entries[3] = entries[3], entries[2]
    elif tamper == "insert":  # a forged entry, its hash computed after the entry before it
        before = json.loads(entries[1])
        entries.insert(2, json.dumps(chained(entry(99), before["seq"] + 1, before["hash"])))
    elif tamper == "cut-end":
        entries.pop()
    elif tamper == "cut-start":
        del entries[:2]
    elif tamper == "cut-all":
        entries.clear()
    elif tamper == "forge-checkpoint":  # the file recomputed to the end and signed by another key
        forger = tmp_path / "forger.ed25519"
        head = json.loads(entries[-1])
        note = json.dumps({"checkpoint": Checkpoint(f"rotator/{trail.ns}", head["seq"], head["hash"]).sign(
            "auditor", write_private_key(forger))})
    path.write_text("\n".join([*entries, note]) + "\n")
    done = trail.verify(path)
    assert done.returncode == 1
    assert named in " ".join(done.stderr.split()), done.stderr


def test_a_trimmed_history_is_proven_against_the_previous_export(tmp_path: Path, redis_server: str) -> None:
    """Redis keeps the last `history_max` entries: the next export starts past the trimmed ones,
    and `--after` proves it joins the previous one; an entry changed in Redis in between, with
    the unkeyed chain recomputed from it, is caught only that way."""
    trail = Trail(tmp_path, redis_server, history_max=10)
    for i in range(10):
        trail.state.record(entry(i))
    first = trail.export("first.jsonl")
    for i in range(10, 20):
        trail.state.record(entry(i))
    second = trail.export("second.jsonl")
    assert [json.loads(x)["seq"] for x in lines(second)[:-1]] == list(range(11, 21))
    done = trail.verify(second, "--after", str(first))
    assert done.returncode == 0 and "seq 11 to 20" in done.stdout, done.stderr

    # Whoever writes Redis rewrites entry 11 and recomputes the chain after it (no HMAC key here).
    stored = trail.state.history(limit=10)[::-1]
    prev = stored[0]["prev"]
    trail.rewrite(stored, prev, lambda i, body: body | ({"status": "failed"} if i == 0 else {}))
    third = trail.export("third.jsonl")
    assert trail.verify(third).returncode == 0  # on its own it looks intact ...
    caught = trail.verify(third, "--after", str(second))
    assert caught.returncode == 1, caught.stdout
    assert "seq 20: does not continue the previous export" in " ".join(caught.stderr.split()), caught.stderr


def test_with_an_hmac_key_a_rewritten_chain_is_caught_on_its_own(tmp_path: Path, redis_server: str) -> None:
    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    for i in range(3):
        trail.state.record(entry(i))
    raw = trail.state.client.lindex(f"{trail.ns}:history", 1)
    old = json.loads(str(raw))
    forged = chained({k: v for k, v in old.items() if k not in ("seq", "prev", "alg", "hash")}
                     | {"status": "failed"}, old["seq"], old["prev"])  # recomputed without the key
    assert forged["alg"] == "sha256" and old["alg"] == "hmac-sha256"
    for edit, named in ((forged, "line 2 (seq 2): an unkeyed entry after keyed ones (from seq 1)"),
                        (forged | {"alg": "hmac-sha256"}, "line 2 (seq 2): edited")):
        trail.state.client.lset(f"{trail.ns}:history", 1, json.dumps(edit))
        path = trail.export("keyed.jsonl")
        done = trail.verify(path)
        assert done.returncode == 1 and named in " ".join(done.stderr.split()), done.stderr
    without_key = trail.cli("verify", str(path), "--public-key", f"auditor={trail.public}")
    assert without_key.returncode == 1 and "--hmac-key-file" in without_key.stderr


def test_the_chain_and_the_note_are_the_published_forms() -> None:
    """SHA-256 over the previous hash's 32 bytes and the RFC 8785 form; the signed note's key id
    is the first 4 bytes of SHA-256(name, newline, 0x01, the raw public key)."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    body = {"seq": 1, "prev": GENESIS, "b": 1.0, "a": "é"}
    assert link(GENESIS, body) == hashlib.sha256(bytes(32) + '{"a":"é","b":1,"prev":"'.encode() + GENESIS.encode()
                                                  + b'","seq":1}').hexdigest()
    key = Ed25519PrivateKey.generate()
    note = Checkpoint("rotator/prod", 7, "ab" * 32).sign("beat", key)
    text, _, signature = note.partition("\n\n")
    assert text == "rotator/prod\n7\n" + base64.b64encode(bytes.fromhex("ab" * 32)).decode()
    raw = base64.b64decode(signature.split()[-1])
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw[:4] == hashlib.sha256(b"beat\n\x01" + public).digest()[:4]
    key.public_key().verify(raw[4:], (text + "\n").encode())
    assert open_note(note, {"beat": [key.public_key()]})[0] == Checkpoint("rotator/prod", 7, "ab" * 32)
    with pytest.raises(AuditError):
        open_note(note, {"other": [key.public_key()]})
    with pytest.raises(AuditError):
        verify([json.dumps({"checkpoint": note.replace("\n7\n", "\n8\n")})], {"beat": [key.public_key()]})


def test_an_old_release_entry_without_a_hash_is_left_out_and_said(tmp_path: Path, redis_server: str) -> None:
    """An older worker during a rolling upgrade writes history without the chain: the chain goes on
    around it, the export leaves it out and says how many."""
    trail = Trail(tmp_path, redis_server)
    trail.state.record(entry(1))
    redis.Redis.from_url(f"{redis_server}/0").lpush(f"{trail.ns}:history", json.dumps(entry(2)))
    trail.state.record(entry(3))
    done = trail.cli("export", "--output", str(tmp_path / "mixed.jsonl"))
    assert done.returncode == 0 and "1 entries written by a release without the audit chain" in done.stderr
    assert trail.verify(tmp_path / "mixed.jsonl").returncode == 0


def test_since_exports_a_contiguous_tail_whatever_the_writers_clocks(tmp_path: Path, redis_server: str) -> None:
    """Writers' clocks differ: `--since` exports from the first entry at or after the time, and
    every entry after it, so the export verifies."""
    trail = Trail(tmp_path, redis_server)
    for i, when in enumerate((100.0, 200.0, 150.0, 300.0, 250.0)):  # the third writer's clock is behind
        trail.state.record(entry(i) | {"time": when})
    path = trail.export("since.jsonl", "--since", "200")
    assert [json.loads(x)["seq"] for x in lines(path)[:-1]] == [2, 3, 4, 5]
    assert trail.verify(path).returncode == 0


def test_a_chain_that_restarts_is_named_against_the_previous_export(tmp_path: Path, redis_server: str) -> None:
    """Redis lost its history (or someone deleted it): the new chain starts at seq 1 and verifies on
    its own; against the previous export it is named for what it is."""
    trail = Trail(tmp_path, redis_server)
    for i in range(3):
        trail.state.record(entry(i))
    first = trail.export("first.jsonl")
    trail.state.client.delete(f"{trail.ns}:history", f"{trail.ns}:history:head")
    trail.state.record(entry(9))
    second = trail.export("second.jsonl")
    assert trail.verify(second).returncode == 0
    done = trail.verify(second, "--after", str(first))
    assert done.returncode == 1 and "the chain restarted at seq 1" in " ".join(done.stderr.split()), done.stderr


def test_an_hmac_key_set_on_a_running_trail_keys_the_entries_from_then_on(tmp_path: Path, redis_server: str) -> None:
    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    plain = RedisState.from_url(f"{redis_server}/0", trail.ns)  # a writer before the key was configured
    for i in range(3):
        plain.record(entry(i))
    for i in range(3, 6):
        trail.state.record(entry(i))
    path = trail.export("switched.jsonl")
    done = trail.verify(path, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"head": "-"} == {"intact": True, "entries": 6, "first_seq": 1, "last_seq": 6,
                                                       "head": "-", "signer": "auditor", "unkeyed": 3}


def test_an_entry_with_a_string_rfc_8785_cannot_hold_is_kept_and_verifies(tmp_path: Path, redis_server: str) -> None:
    """A byte that is not UTF-8 in a `--reason` reaches Python as a lone surrogate: the entry is
    still written (hashed in its escaped form) and the export verifies."""
    trail = Trail(tmp_path, redis_server)
    trail.state.record(entry(1) | {"note": "bad byte \udcff here"})
    assert trail.state.history()[0]["note"] == "bad byte \udcff here"
    assert trail.verify(trail.export("surrogate.jsonl")).returncode == 0


def test_a_keyed_trail_rewritten_without_the_key_after_an_export_is_caught(tmp_path: Path, redis_server: str) -> None:
    """Whoever can write Redis but lacks the HMAC key rewrites the entries after the last export
    with plain SHA-256 and lets Redis trim the older ones: the next export, verified against the
    previous one (whose head was keyed), names the first rewritten entry."""
    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    for i in range(5):
        trail.state.record(entry(i))
    first = trail.export("first.jsonl")
    assert "export first 1 hmac" in json.loads(lines(first)[-1])["checkpoint"]
    for i in range(5, 9):
        trail.state.record(entry(i) | {"actor": "mallory"})
    stored = [e for e in trail.state.history(limit=100)[::-1] if e["seq"] > 5]
    trail.rewrite(stored, json.loads(lines(first)[-2])["hash"],
                  lambda _, body: {k: v for k, v in body.items() if k != "actor"})
    second = trail.export("second.jsonl")
    done = trail.verify(second, "--after", str(first))
    assert done.returncode == 1, done.stdout
    assert "line 1 (seq 6): unkeyed, after the previous export's keyed head (seq 5)" in " ".join(done.stderr.split())


def test_a_writer_without_the_key_never_appends_to_a_keyed_trail(tmp_path: Path, redis_server: str) -> None:
    """A CLI configured without `[audit]` next to keyed workers: its entry is refused, loudly,
    instead of breaking the chain for every later export."""
    from rotator.errors import RotatorError

    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    trail.state.record(entry(1))
    keyless = RedisState.from_url(f"{redis_server}/0", trail.ns)
    with pytest.raises(RotatorError, match="audit.hmac_key_file"):
        keyless.record(entry(2))
    trail.state.record(entry(3))
    assert trail.verify(trail.export("still.jsonl")).returncode == 0


def test_an_export_with_no_entries_still_says_the_head_is_keyed(tmp_path: Path, redis_server: str) -> None:
    """A routine `--since` export that holds nothing carries the head's keyed flag, so a rewrite
    without the key after it is still caught against it."""
    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    for i in range(5):
        trail.state.record(entry(i))
    first = trail.export("first.jsonl")
    empty = trail.export("empty.jsonl", "--since", "4000000000")
    assert lines(empty)[:-1] == [] and "export first 6 hmac" in json.loads(lines(empty)[-1])["checkpoint"]
    assert trail.verify(empty, "--after", str(first)).returncode == 0
    prev, forged = json.loads(lines(first)[-2])["hash"], []
    for i in range(5, 9):
        forged.append(chained(entry(i), i + 1, prev))  # without the key
        prev = forged[-1]["hash"]
    trail.state.client.lpush(f"{trail.ns}:history", *[json.dumps(e) for e in forged])
    trail.state.client.set(f"{trail.ns}:history:head", f"9:{prev}:sha256")
    rewritten = trail.export("rewritten.jsonl")
    done = trail.verify(rewritten, "--after", str(empty))
    assert done.returncode == 1 and "rewritten without the HMAC key" in " ".join(done.stderr.split()), done.stderr


def test_check_config_ping_names_a_configuration_without_the_key_of_a_keyed_history(
    tmp_path: Path, redis_server: str
) -> None:
    key = b"audit-hmac-key-" + os.urandom(24).hex().encode()
    trail = Trail(tmp_path, redis_server, hmac_key=key)
    trail.state.record(entry(1))
    keyless = tmp_path / "keyless.toml"
    keyless.write_text(trail.config.read_text().split("[audit]")[0])
    env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY}
    done = subprocess.run([sys.executable, "-m", "rotator.cli", "check-config", "--ping", "--config", str(keyless)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "fail audit history: the history is keyed" in " ".join(done.stderr.split()), done.stderr
    with_key = subprocess.run([sys.executable, "-m", "rotator.cli", "check-config", "--ping", "--config",
                               str(trail.config)], env=env, capture_output=True, text=True, timeout=60)
    assert "ok   audit history" in with_key.stderr, with_key.stderr
