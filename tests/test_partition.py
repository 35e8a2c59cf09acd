"""Two hosts and a real network partition, in network namespaces this test makes itself.

A services namespace runs a private Redis (state and broker), the key-service emulator and OpenBao;
two host namespaces each run a rotator worker and reach the services through a veth link of their
own. Nothing listens where the test process is: it drives and inspects the services through
`tests/partition_probe.py`, run inside their namespace. Skipped, with the reason, where network
namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator.embedded import redis_server_binary
from rotator.openbao import bao_binary
from tests.conftest import FP_KEY, TOKEN
from tests.test_celery import stop_groups, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MOUNT = "secret"
CLIENT, KEY = "acme-prod", "key_payouts"


def _namespaces_problem() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"rotator-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class Network:
    """A services namespace and host namespaces, each host linked to the services by a veth pair
    (host side 10.231.N.2, services side 10.231.N.1); every process started here is stopped and
    every namespace deleted at the end."""

    def __init__(self, tmp: Path) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.tmp = tmp
        self.svc = f"rp{self.run}-svc"
        self.hosts: dict[str, tuple[str, str]] = {}  # name -> (namespace, host-side interface)
        self.namespaces: list[str] = []  # each recorded before it is made, so close() deletes it
        self.links: list[str] = []  # veth pairs made in this namespace, deleted if still here
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def make_services(self) -> None:
        self.namespaces.append(self.svc)
        self._ip("netns", "add", self.svc)
        self._in(self.svc, "ip", "link", "set", "lo", "up")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def _in(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True, timeout=30)

    def add_host(self, name: str, n: int) -> str:
        """A host namespace linked to the services; the services' address as this host sees it."""
        ns, here, there = f"rp{self.run}-{name}", f"rp{self.run}{name}", f"rp{self.run}{name}s"
        self.namespaces.append(ns)
        self._ip("netns", "add", ns)
        self._in(ns, "ip", "link", "set", "lo", "up")
        self.links.append(here)
        self._ip("link", "add", here, "type", "veth", "peer", "name", there)
        self._ip("link", "set", here, "netns", ns)
        self._ip("link", "set", there, "netns", self.svc)
        self._in(ns, "ip", "addr", "add", f"10.231.{n}.2/24", "dev", here)
        self._in(self.svc, "ip", "addr", "add", f"10.231.{n}.1/24", "dev", there)
        self._in(ns, "ip", "link", "set", here, "up")
        self._in(self.svc, "ip", "link", "set", there, "up")
        self.hosts[name] = (ns, here)
        return f"10.231.{n}.1"

    def cut(self, name: str) -> None:
        ns, here = self.hosts[name]
        self._in(ns, "ip", "link", "set", here, "down")

    def heal(self, name: str) -> None:
        ns, here = self.hosts[name]
        self._in(ns, "ip", "link", "set", here, "up")

    def start(self, ns: str, label: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{label}.log"
        self.logs.append(log)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], env=env, cwd=ROOT, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def probe(self, *args: str, env: dict[str, str]) -> dict[str, Any]:
        out = subprocess.run(["ip", "netns", "exec", self.svc, sys.executable, "-m", "tests.partition_probe", *args],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def close(self) -> None:
        stop_groups(self.procs)
        for link in self.links:  # still here only if it was never moved into its namespace
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in self.namespaces:  # deleting a namespace deletes the links inside it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    problem = _namespaces_problem()
    if problem is not None:
        pytest.skip(f"two hosts need network namespaces: {problem}")
    net = Network(tmp_path)
    try:
        net.make_services()
        yield net
    finally:
        net.close()


def host_config(tmp: Path, name: str, services: str) -> Path:
    """One host's config: everything at the services' address as this host sees it; a 5 s lease,
    a recovery sweep every 2 s, and a key-service deadline long enough to wait for a late answer."""
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[keyservice]
url = "http://{services}:8400"
timeout_s = 40
max_attempts = 1
call_deadline_s = 60
[policy]
mode = "enforce"
[state]
redis_url = "redis://{services}:6379/0"
lock_ttl_s = 5
[celery]
broker_url = "redis://{services}:6379/1"
result_backend = "redis://{services}:6379/2"
scan_every_s = 3600
recover_every_s = 2
visibility_timeout_s = 900
concurrency = 1
[engine]
sink_retry_s = 10
[[sinks]]
kind = "vault"
url = "http://{services}:8200"
mount = "{MOUNT}"
path = "rotator/{{client_id}}/{{key_id}}"
auth = "approle"
role_id_env = "ROLE_ID"
secret_id_env = "SECRET_ID"
timeout_s = 3
""")
    return path


def test_a_host_cut_off_between_reset_and_store_is_taken_over_and_changes_nothing_once_back(
    network: Network, tmp_path: Path,
) -> None:
    """Host 1 resets the key; its answer is late and, meanwhile, host 1 is cut off (link down).
    After its lease ends, host 2's recovery sweep takes the key over under the protocol: it reads
    the reset's stored answer and stores the secret in Vault. Host 1, back on the network and
    handed the late answer, finds its lease gone and changes nothing: one reset, one Vault
    version, the secret authenticates."""
    root_token = "root-" + uuid.uuid4().hex
    env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY,
           "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "ROTATOR_LOG_LEVEL": "DEBUG"}
    probe_env = {**env, "BAO_TOKEN": root_token}  # the probe's alone: no worker holds the root token
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"token": TOKEN, "clients": [{
        "client_id": CLIENT, "name": "Acme", "created_days_ago": 400,
        "keys": [{"alias": "Auto-generated key", "auto_generated": True, "created_days_ago": 400, "reset_days_ago": 5},
                 {"id": KEY, "alias": "payouts", "created_days_ago": 120}]}]}))
    (tmp_path / "redis").mkdir()
    net = network
    net.start(net.svc, "redis", redis_server_binary(), "--bind", "0.0.0.0", "--port", "6379", "--protected-mode",
              "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path / "redis"), env=env)
    net.start(net.svc, "emulator", sys.executable, "-m", "rotator.cli", "emulator", "--host", "0.0.0.0", "--port",
              "8400", "--seed", str(seed), env=env)
    net.start(net.svc, "openbao", bao_binary(), "server", "-dev", "-dev-listen-address=0.0.0.0:8200",
              env={**env, "BAO_DEV_ROOT_TOKEN_ID": root_token})
    h1 = net.add_host("h1", 1)
    h2 = net.add_host("h2", 2)
    assert net.probe("wait", env=probe_env)["up"], [p.read_text(errors="replace")[-500:] for p in net.logs]
    login = net.probe("setup", MOUNT, env=probe_env)
    env = {**env, "ROLE_ID": login["role_id"], "SECRET_ID": login["secret_id"]}
    probe_env = {**probe_env, **env}
    ns1, ns2 = net.hosts["h1"][0], net.hosts["h2"][0]

    def state() -> dict[str, Any]:
        return net.probe("state", CLIENT, KEY, MOUNT, env=probe_env)

    # Host 1 alone: its worker takes the rotation; the reset commits and its answer comes 12 s late.
    fault = json.dumps({"method": "POST", "path": "/reset$", "late_s": 12})
    assert net.probe("fault", fault, env=probe_env)["status"] == 204
    worker1 = net.start(ns1, "worker-h1", sys.executable, "-m", "rotator.cli", "worker", "--config",
                        str(host_config(tmp_path, "h1", h1)), "--loglevel", "DEBUG", env=env)
    wait_for(lambda: b" ready." in net.logs[-1].read_bytes(), 60, "host 1's worker")
    log1 = net.logs[-1]
    enqueue = subprocess.run(["ip", "netns", "exec", ns1, sys.executable, "-m", "rotator.cli", "rotate",
                              "--client-id", CLIENT, "--key-id", KEY, "--apply", "--enqueue", "--config",
                              str(tmp_path / "h1.toml")], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert enqueue.returncode == 0, enqueue.stderr
    wait_for(lambda: state()["resets"] == 1, 30, "host 1's reset")
    net.cut("h1")  # between the reset and the store: host 1 waits for the answer, cut off from everything
    assert state()["vault_versions"] == 0

    # Host 2: worker and beat; the recovery sweep takes the key over once host 1's lease has ended.
    net.start(ns2, "worker-h2", sys.executable, "-m", "rotator.cli", "worker", "--config",
              str(host_config(tmp_path, "h2", h2)), "--loglevel", "DEBUG", env=env)
    net.start(ns2, "beat-h2", sys.executable, "-m", "rotator.cli", "beat", "--config", str(tmp_path / "h2.toml"),
              "--schedule", str(tmp_path / "beat-h2"), env=env)
    wait_for(lambda: state()["vault_versions"] == 1 and (state()["last"] or {}).get("status") == "recovered"
             and not state()["attempts"], 60, "host 2 to store the secret and settle the attempt")
    taken_over = state()
    assert taken_over["resets"] == 1 and taken_over["authenticates"], taken_over

    # Host 1 back: the late answer reaches it (or its deadline passes); its lease is gone, it stops.
    net.heal("h1")
    finished = re.compile(rb"Task rotator\.rotate_key\[[0-9a-f-]+\] (succeeded|raised|retry)")
    wait_for(lambda: finished.search(log1.read_bytes()) is not None or worker1.poll() is not None,
             90, "host 1's rotation to end")
    time.sleep(2)  # anything host 1 would still do
    after = state()
    assert after == taken_over, (after, taken_over)  # resets, Vault, and Redis: no attempt, the same last rotation
    assert after["attempts"] == [] and after["last"]["status"] == "recovered", after
    text = log1.read_text(errors="replace")
    assert "rotation.lease_lost" in text, text[-3000:]
    assert worker1.poll() is None  # the worker itself lives on
