"""`rotator web` against a seeded emulator and real rotations: its JSON is `status --json`, it
changes nothing, it refuses to face the network without a token, and in headless Chromium it shows
the cards and rows, sorts, refreshes in place, opens a key's history, and prints hostile aliases as
text."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
import redis
from typer.testing import CliRunner

from rotator.cli import app as cli
from rotator.config import Settings, settings_from_mapping
from rotator.domain import KeyRef
from rotator.engine import Engine, report
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.fleet import status_report
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.runtime import build_engine
from rotator.sinks import registry
from rotator.state import RedisState
from rotator.web import app as web_app
from rotator.web import source as web_source
from rotator.web.app import create_app
from rotator.web.limits import listening_socket
from rotator.web.server import WebOptions, build_app, server
from rotator.web.source import FleetSource, Quiet
from tests.conftest import FP_KEY, redis_text

DAY = 86_400
FP = Fingerprinter(FP_KEY)
IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>alert(2)</script>"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
runner = CliRunner()


@dataclass
class Fleet:
    emulator: Emulator
    keyservice: HttpKeyService
    state: RedisState
    settings: Settings
    config: Path
    keys: dict[str, str]
    keys_sbx: str
    redis_url: str

    def engine(self, *sink_names: str) -> Engine:
        sinks = [registry.build("memory", {"name": n}, FP) for n in sink_names or ("primary", "replica")]
        return Engine(self.keyservice, sinks, self.state, CapturePublisher(), FP, Policy())

    def secrets(self) -> list[str]:
        """Every secret of the fleet: the live ones and every one a sink holds (dead ones too)."""
        stored = [doc["api_key"] for name in ("primary", "replica") for c, k in self.refs()
                  for doc in registry.build("memory", {"name": name}, FP).versions(KeyRef(c, k))]
        assert len(stored) >= 5
        return [self.emulator.current_secret(c, k) for c, k in self.refs()] + stored

    def refs(self) -> list[tuple[str, str]]:
        return [("acme", k) for k in self.keys.values()] + [("sbx", self.keys_sbx)]



@pytest.fixture
def fleet(tmp_path: Path, env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer,
          keyservice: HttpKeyService, state: RedisState, redis_server: str) -> Fleet:
    """One fleet with every case the page shows: rotated, failed, in doubt, a stale sink, due soon
    (within a week and within the warning period), young, hostile aliases, another environment."""
    now = emulator.now()
    keys = {"auto": next(iter(emulator.add_client("acme", created_at=now - 400 * DAY).keys))}
    for name, age in (("billing", 200), ("ledger", 100), ("stuck", 120), ("soon", 85), ("later", 80),
                      ("young", 10), (IMG, 30), (SCRIPT, 31)):
        keys[name] = emulator.add_key("acme", name, created_at=now - age * DAY).id
    sbx = next(iter(emulator.add_client("sbx", environment="SANDBOX", created_at=now - 400 * DAY).keys))
    path = tmp_path / "rotator.toml"
    path.write_text(f"""
[keyservice]
url = "{emulator_server.url}"
[state]
redis_url = "{redis_server}/0"
namespace = "{state.ns}"
[celery]
broker_url = "{redis_server}/1"
[web]
refresh_s = 1
cache_s = 0
[[sinks]]
kind = "memory"
name = "primary"
[[sinks]]
kind = "memory"
name = "replica"
""")
    env.setenv("ROTATOR_CONFIG", str(path))
    settings = settings_from_mapping(tomllib.loads(path.read_text()))
    f = Fleet(emulator, keyservice, state, settings, path, keys, sbx, f"{redis_server}/0")
    both, primary_only = f.engine(), f.engine("primary")
    assert both.rotate(KeyRef("acme", keys["auto"]), trigger="schedule").status == "succeeded"
    assert both.rotate(KeyRef("acme", keys["ledger"]), trigger="schedule").status == "succeeded"
    # the replica misses the next rotation (a second later: dates are whole seconds): it holds a dead secret
    emulator.clock_offset_s = 2
    assert primary_only.rotate(KeyRef("acme", keys["ledger"]), trigger="manual", force=True,
                               reason="replica down").status == "succeeded"
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403))
    assert both.rotate(KeyRef("acme", keys["billing"]), trigger="schedule").status == "failed"
    emulator.add_fault(Fault(method="POST", path="/reset$", status=500, times=100))
    # The replay that would settle it fails too, behind a gateway whose error names the URL.
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=100))
    stuck = both.rotate(KeyRef("acme", keys["stuck"]), trigger="schedule")
    assert stuck.status == "in_doubt" and "replay of the stored answer failed: 503" in stuck.reason, stuck.reason
    emulator.clear_faults()
    return f


@contextmanager
def running(app: Any) -> Iterator[httpx.Client]:
    """An app under the same uvicorn server `rotator web` runs, on a free loopback port, in a thread;
    yields a client for it."""
    sock = listening_socket("127.0.0.1", 0)
    srv = server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=20) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def page(fleet: Fleet) -> Iterator[str]:
    """The real `rotator web` app (as the command builds it) under uvicorn, in a thread."""
    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings, port=0))
    with running(app) as client:
        yield str(client.base_url).rstrip("/")
    source.close()


def cli_status(fleet: Fleet) -> dict[str, Any]:
    result = runner.invoke(cli, ["status", "--json", "--history", "--config", str(fleet.config)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_json_is_status_json_with_the_counts_and_no_secret(fleet: Fleet, page: str) -> None:
    """/api/status holds every field `status --json --history` prints, with the same values (and
    adds strategy, sinks, summary); the counts match the seeded cases; no secret, no fingerprint."""
    web = httpx.get(f"{page}/api/status").json()
    cli_report = cli_status(fleet)
    assert len(web["keys"]) == len(cli_report["keys"]) == 10
    for ours, theirs in zip(web["keys"], cli_report["keys"], strict=True):
        assert abs(ours.pop("age_days") - theirs.pop("age_days")) < 0.02
        assert {k: ours[k] for k in theirs} == theirs
        assert set(ours) - set(theirs) == {"strategy", "sinks"}
    for part in ("in_flight", "drift", "history"):
        assert web[part] == cli_report[part], part
    # Without the page's extras, the library call is `status --json --history` itself.
    engine = build_engine(fleet.settings, publisher=Quiet())
    plain = status_report(engine, history=50, with_sinks=False)
    engine.close()
    engine.keyservice.close()
    assert set(plain) == set(cli_report)
    assert [{**k, "age_days": 0} for k in plain["keys"]] == [{**k, "age_days": 0} for k in cli_report["keys"]]
    assert web["summary"] == {"keys_in_scope": 9, "due_soon": 2, "overdue": 2, "in_flight": 0, "in_doubt": 1,
                              "at_risk": 0, "failed": 1, "drift": 1, "retiring": 0}
    rows = {k["key_id"]: k for k in web["keys"]}
    assert rows[fleet.keys["ledger"]]["sinks"] == {"memory:primary": "fresh", "memory:replica": "stale"}
    assert rows[fleet.keys["auto"]]["sinks"] == {"memory:primary": "fresh", "memory:replica": "fresh"}
    assert rows[fleet.keys["young"]]["sinks"] == {"memory:primary": "empty", "memory:replica": "empty"}
    assert rows[fleet.keys_sbx]["sinks"] == {} and rows[fleet.keys_sbx]["state"] == "out_of_scope"
    assert {k["strategy"] for k in web["keys"]} == {"reset"}
    assert rows[fleet.keys[IMG]]["alias"] == IMG and rows[fleet.keys[SCRIPT]]["alias"] == SCRIPT
    key = httpx.get(f"{page}/api/keys/acme/{fleet.keys['ledger']}").json()
    assert [s["state"] for s in key["sinks"]] == ["fresh", "stale"]
    assert [e["note"] for e in key["history"]][:1] == ["replica down"]
    texts = [httpx.get(f"{page}{p}").text for p in ("/", "/api/status", f"/keys/acme/{fleet.keys['ledger']}",
                                                     f"/api/keys/acme/{fleet.keys['ledger']}")]
    for secret in fleet.secrets():
        assert not any(secret in t or FP(secret) in t for t in texts)
    # The Idempotency-Keys read the live secrets from the stored answers: as secret as they are.
    keys_sent = fleet.emulator.idempotency_keys()
    assert len(keys_sent) >= 4
    everything = "\n".join([*texts, json.dumps(cli_report), redis_text(fleet.state.client, f"{fleet.state.ns}:*")])
    for ik in keys_sent:
        assert ik not in everything and f"responses/{ik}" not in everything


def test_out_of_scope_keys_are_never_due_and_unrotated_sinks_read_neutral(fleet: Fleet, page: str) -> None:
    """The sandbox key shows no due date; the sinks of a key never rotated read neutral (`idle`),
    on the fleet page and the key's page, while those of a key whose rotation went wrong stay amber."""
    html = httpx.get(f"{page}/").text

    def row(key_id: str) -> str:
        found = re.search(rf'<tr data-client="[^"]*" data-key="{re.escape(key_id)}".*?</tr>', html, re.S)
        assert found is not None, key_id
        return found.group(0)

    due = row(fleet.keys_sbx).split('<td class="due', 1)[1].split("</td>", 1)[0]
    assert due.startswith(' due-none"') and "<time" not in due and "ago" not in due
    assert row(fleet.keys["young"]).count("sink sink-idle") == 2 and "sink-empty" not in row(fleet.keys["young"])
    assert row(fleet.keys["stuck"]).count("sink sink-empty") == 2
    assert httpx.get(f"{page}/keys/acme/{fleet.keys['young']}").text.count("sink sink-idle") == 2
    sandbox_page = httpx.get(f"{page}/keys/sbx/{fleet.keys_sbx}").text
    assert "never: the policy leaves this key alone" in sandbox_page and " ago)" not in sandbox_page


def redis_contents(fleet: Fleet) -> dict[bytes, bytes]:
    """Every key of the fleet's namespace with its serialised value."""
    with redis.Redis.from_url(fleet.redis_url) as raw:
        return {key: raw.dump(key) for key in raw.scan_iter(f"{fleet.state.ns}:*")}


def test_read_only_headers_and_hostile_input_on_the_wire(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only GET/HEAD; strict CSP and friends on every answer; a non-loopback Host is refused
    without a credential (DNS rebinding); ids outside the id rule are 404; aliases arrive escaped;
    looking sends no event (the fleet has drift, which reconcile alerts)."""
    emitted: list[str] = []
    monkeypatch.setattr(report, "emit", lambda ctx, name, *args, **kwargs: emitted.append(name))
    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings))
    assert isinstance(source.engine.publisher, Quiet)
    with running(app) as client:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for path in ("/", "/api/status", "/static/app.js"):
                answer = client.request(method, path)
                assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"
        before, stored = fleet.emulator.ledger[:], redis_contents(fleet)
        for path in ("/", "/api/status", f"/keys/acme/{fleet.keys['ledger']}", f"/api/keys/acme/{fleet.keys['stuck']}"):
            assert client.get(path).status_code == 200
        home = client.get("/")
        assert home.status_code == 200
        assert "script-src 'self'" in home.headers["content-security-policy"]
        assert "unsafe-inline" not in home.headers["content-security-policy"]
        assert home.headers["x-content-type-options"] == "nosniff" and home.headers["x-frame-options"] == "DENY"
        assert "<script>" not in home.text and "<script src=" in home.text  # no inline script at all
        assert "&lt;img src=x onerror=alert(1)&gt;" in home.text and IMG not in home.text
        assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in home.text and SCRIPT not in home.text
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/", headers={"host": "rebound.example:9465"}).status_code == 421
        assert client.get("/keys/acme/..").status_code == 404
        assert client.get("/keys/acme/nope").status_code == 404
        assert client.get("/keys/acme/a%3Cb").status_code == 404
        assert fleet.emulator.ledger == before  # looking reset nothing
        assert redis_contents(fleet) == stored  # and wrote nothing to Redis
        assert client.get("/api/status").json()["summary"]["drift"] == 1
        assert emitted == []  # and alerted nothing
    source.close()


def test_mounted_under_a_prefix_next_to_metrics(fleet: Fleet) -> None:
    """The app mounts under any prefix (its links and scripts follow it), and `--metrics` serves
    Prometheus's text next to the page, behind the same guard."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings, metrics=True))
    outer = Starlette(routes=[Mount("/status", app=app)])
    with running(outer) as client:
        home = client.get("/status/")
        assert home.status_code == 200
        assert 'src="/status/static/app.js"' in home.text
        assert f'href="/status/keys/acme/{fleet.keys["billing"]}"' in home.text
        assert 'data-fragment-url="/status/fragment/fleet"' in home.text
        assert client.get("/status/fragment/fleet").text.lstrip().startswith('<div id="fleet"')
        metrics = client.get("/status/metrics/")
        assert metrics.status_code == 200 and "rotator_key_age_seconds" in metrics.text
        assert client.post("/status/metrics/").status_code == 405
    source.close()


def test_a_token_guards_every_route_but_healthz(fleet: Fleet, env: pytest.MonkeyPatch) -> None:
    """With a token: Bearer or Basic (user `rotator`, the token as password) pass, anything else is
    401 with a Basic challenge; /healthz answers without it."""
    env.setenv("WEB_TOKEN", "s3cret-web-token")
    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings, host="0.0.0.0", token_env="WEB_TOKEN"))
    basic = base64.b64encode(b"rotator:s3cret-web-token").decode()
    wrong = base64.b64encode(b"admin:s3cret-web-token").decode()
    with running(app) as client:
        assert client.get("/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": f"Basic {wrong}"},
                        {"authorization": "Basic !!!"}):
            answer = client.get("/api/status", headers=headers)
            assert answer.status_code == 401 and "s3cret" not in answer.text
            assert answer.headers["www-authenticate"].startswith("Basic")
        assert client.get("/api/status", headers={"authorization": "Bearer s3cret-web-token"}).status_code == 200
        assert client.get("/", headers={"authorization": f"Basic {basic}"}).status_code == 200
    source.close()


def test_rotator_web_refuses_a_network_bind_without_a_token(fleet: Fleet, env: pytest.MonkeyPatch) -> None:
    """`rotator web --host 0.0.0.0` without a credential, or with one named but empty, exits 2 and
    says why, before it listens."""
    result = runner.invoke(cli, ["web", "--host", "0.0.0.0", "--port", "0", "--config", str(fleet.config)])
    assert result.exit_code == 2 and "--token-env" in result.stderr, result.stderr
    env.delenv("NO_SUCH_TOKEN", raising=False)
    result = runner.invoke(cli, ["web", "--host", "0.0.0.0", "--port", "0", "--token-env", "NO_SUCH_TOKEN",
                                 "--config", str(fleet.config)])
    assert result.exit_code == 2 and "NO_SUCH_TOKEN" in result.stderr, result.stderr
    result = runner.invoke(cli, ["web", "--host", "0.0.0.0", "--port", "0", "--token-file",
                                 str(fleet.config.parent / "missing"), "--config", str(fleet.config)])
    assert result.exit_code == 2, result.stderr


def test_rotator_web_refuses_a_short_token(fleet: Fleet, env: pytest.MonkeyPatch) -> None:
    """A token shorter than 16 characters is a config error naming the key, never the value."""
    def no_server(app: Any) -> Any:
        raise AssertionError("rotator web started with a short token")

    env.setattr("rotator.web.server.server", no_server)
    env.setenv("WEB_TOKEN", "tiny-tok3n-15ch")
    result = runner.invoke(cli, ["web", "--host", "0.0.0.0", "--port", "0", "--token-env", "WEB_TOKEN",
                                 "--config", str(fleet.config)])
    assert result.exit_code == 2, result.stderr
    assert "web.token_env" in result.stderr and "16 characters" in result.stderr
    assert "tiny-tok3n" not in result.stderr + result.stdout
    short = fleet.config.parent / "web-token"
    short.write_text("x" * 15 + "\n")
    result = runner.invoke(cli, ["web", "--host", "0.0.0.0", "--port", "0", "--token-file", str(short),
                                 "--config", str(fleet.config)])
    assert result.exit_code == 2 and "web.token_file" in result.stderr, result.stderr
    short.write_text("x" * 16 + "\n")  # 16 is enough
    _app, source = build_app(fleet.settings, WebOptions.of(fleet.settings, host="0.0.0.0", token_file=short))
    source.close()


def test_web_help_shows_the_defaults() -> None:
    """`rotator web --help` names the web section's defaults (rich once ate `[web]` as markup)."""
    result = runner.invoke(cli, ["web", "--help"])
    assert result.exit_code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())
    assert "default .host" not in text and "default .port" not in text
    assert "the web section's host, 127.0.0.1" in text and "the web section's port, 9465" in text


def settings_with(fleet: Fleet, **sections: dict[str, Any]) -> Settings:
    """The fleet's configuration with some keys of some sections changed."""
    data = tomllib.loads(fleet.config.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return settings_from_mapping(data)


def test_one_report_lists_the_keys_once_and_reads_each_sink_once(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report (the page's and `status --json`'s) lists each Client ID once and reads each sink
    once per key: the drift check reuses what the rows listed and read."""
    engine = fleet.engine()
    listed: list[str] = []
    reads: Counter[tuple[str, str]] = Counter()
    list_keys = fleet.keyservice.list_keys

    def counted_list(client_id: str) -> Any:
        listed.append(client_id)
        return list_keys(client_id)

    monkeypatch.setattr(fleet.keyservice, "list_keys", counted_list)
    for sink in engine.sinks:
        def counted_read(key: Any, real: Any = sink.read_state, name: str = sink.describe()) -> Any:
            reads[(name, str(key.ref))] += 1
            return real(key)

        monkeypatch.setattr(sink, "read_state", counted_read)
    for with_sinks in (True, False):
        listed.clear()
        reads.clear()
        report = status_report(engine, history=5, with_sinks=with_sinks)
        assert sorted(listed) == ["acme", "sbx"], with_sinks
        in_scope = [f"{k['client_id']}/{k['key_id']}" for k in report["keys"] if k["state"] != "out_of_scope"]
        assert len(in_scope) == 9
        assert reads == Counter({(s.describe(), ref): 1 for s in engine.sinks for ref in in_scope}), with_sinks
        if with_sinks:
            assert report["summary"]["drift"] == 1 and len(report["drift"]) == 1


def test_each_body_is_rendered_once_per_snapshot(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within `cache_s`, one report and one render of each body serve every request, the same
    bytes each time (sent in pieces); the next snapshot renders afresh."""
    reports: list[float] = []
    real_report = web_source.status_report

    def counted_report(engine: Engine, **kwargs: Any) -> dict[str, Any]:
        reports.append(time.monotonic())
        return real_report(engine, **kwargs)

    rendered: Counter[str] = Counter()
    real_render = jinja2.Template.render

    def counted_render(self: jinja2.Template, *args: Any, **kwargs: Any) -> str:
        rendered[str(self.name)] += 1
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(web_source, "status_report", counted_report)
    monkeypatch.setattr(jinja2.Template, "render", counted_render)
    monkeypatch.setattr(web_app, "CHUNK", 1000)  # every body goes out in many pieces
    settings = settings_with(fleet, web={"cache_s": 60})
    app, source = build_app(settings, WebOptions.of(settings))
    with running(app) as client:
        for path in ("/", "/fragment/fleet", "/api/status"):
            bodies = {client.get(path).content for _ in range(4)}
            assert len(bodies) == 1, path
            [body] = bodies
            assert len(body) > 5000
        assert client.head("/").status_code == 200
        assert len(reports) == 1
        assert rendered == Counter({"index.html": 1, "_fleet.html": 1})
        source._snapshot = None  # type: ignore[attr-defined]  # the next request takes a new one
        assert client.get("/").status_code == 200
        assert len(reports) == 2 and rendered["index.html"] == 2
    source.close()


def test_one_report_at_a_time_and_nothing_else_waits_for_it(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many requests while a slow report runs: they all get that one report (no report each, even
    with `cache_s = 0`), and meanwhile /healthz and a key's page answer at once."""
    gate, started = threading.Event(), threading.Event()
    calls: list[float] = []
    real_report = web_source.status_report

    def slow_report(engine: Engine, **kwargs: Any) -> dict[str, Any]:
        calls.append(time.monotonic())
        started.set()
        gate.wait(10)
        return real_report(engine, **kwargs)

    monkeypatch.setattr(web_source, "status_report", slow_report)
    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings))  # cache_s = 0
    with running(app) as client, ThreadPoolExecutor(max_workers=50) as pool:
        try:
            waiting = [pool.submit(client.get, "/api/status") for _ in range(45)]
            waiting += [pool.submit(client.get, "/fragment/fleet") for _ in range(3)]
            assert started.wait(5)
            time.sleep(0.3)  # every request has arrived and waits
            asked = time.monotonic()
            assert client.get("/healthz", timeout=2).text == "ok\n"
            key = client.get(f"/api/keys/acme/{fleet.keys['ledger']}", timeout=3)
            assert key.status_code == 200 and [s["state"] for s in key.json()["sinks"]] == ["fresh", "stale"]
            assert time.monotonic() - asked < 1.5
        finally:
            gate.set()
        answers = [f.result() for f in waiting]
    source.close()
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["generated_at"] for a in answers if a.url.path == "/api/status"}) == 1
    assert len(calls) == 1


def test_healthz_answers_with_every_worker_thread_busy(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """/healthz runs on the event loop: with every key-page thread held by slow key pages and
    their waiting line full (the rest refused at once), the liveness probe still answers at once."""
    gate, started = threading.Event(), threading.Event()
    real_key_report = web_source.key_report

    def slow_key_report(engine: Engine, ref: KeyRef, **kwargs: Any) -> dict[str, Any]:
        started.set()
        gate.wait(10)
        return real_key_report(engine, ref, **kwargs)

    monkeypatch.setattr(web_source, "key_report", slow_key_report)
    app, source = build_app(fleet.settings, WebOptions.of(fleet.settings))
    with running(app) as client, ThreadPoolExecutor(max_workers=50) as pool:
        try:
            waiting = [pool.submit(client.get, f"/keys/acme/{fleet.keys['ledger']}") for _ in range(48)]
            assert started.wait(5)
            time.sleep(0.3)  # the key pages' threads are taken, their waiting line full
            asked = time.monotonic()
            assert client.get("/healthz", timeout=2).text == "ok\n"
            assert time.monotonic() - asked < 1
        finally:
            gate.set()
        codes = Counter(f.result().status_code for f in waiting)
        assert codes == {200: web_app.KEY_THREADS + web_app.KEY_WAITING,
                         503: 48 - web_app.KEY_THREADS - web_app.KEY_WAITING}, codes
    source.close()


def test_a_client_outside_the_configured_ones_is_not_found(fleet: Fleet) -> None:
    """With `keyservice.clients`, a key of another Client ID is 404, as on the fleet page where it
    is not listed."""
    settings = settings_with(fleet, keyservice={"clients": ["acme"]})
    app, source = build_app(settings, WebOptions.of(settings))
    with running(app) as client:
        assert {k["client_id"] for k in client.get("/api/status").json()["keys"]} == {"acme"}
        assert client.get(f"/api/keys/acme/{fleet.keys['ledger']}").status_code == 200
        for path in (f"/api/keys/sbx/{fleet.keys_sbx}", f"/keys/sbx/{fleet.keys_sbx}"):
            assert client.get(path).status_code == 404, path
    source.close()


def test_redis_down_is_a_503_with_one_log_line(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """With Redis unreachable, every page is 503 (the error page, or `{"error": …}` JSON) and one
    log line each, never a traceback; /healthz still answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    settings = settings_with(fleet, state={"redis_url": f"redis://127.0.0.1:{dead}/0"})
    app, source = build_app(settings, WebOptions.of(settings))
    key = fleet.keys["ledger"]
    with running(app) as client:
        capsys.readouterr()
        for path in ("/", "/fragment/fleet", f"/keys/acme/{key}"):
            answer = client.get(path)
            assert answer.status_code == 503 and answer.headers["content-type"].startswith("text/html"), path
            assert "Redis did not answer" in answer.text and "Traceback" not in answer.text
        for path in ("/api/status", f"/api/keys/acme/{key}"):
            answer = client.get(path)
            assert answer.status_code == 503, path
            assert answer.json()["error"].startswith("Redis did not answer"), path
        assert client.get("/healthz").status_code == 200
        logged = capsys.readouterr().err
    source.close()
    lines = [line for line in logged.splitlines() if "did not answer" in line]
    assert len(lines) == 5, logged
    assert "Traceback" not in logged


# --- in a real browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from the OS packages, driven through its chromedriver; nothing downloaded."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them when it runs as root)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(15)
    yield driver
    driver.quit()


def wait_for(condition: Any, timeout: float = 8.0) -> Any:
    """Polls `condition`; an element replaced by a refresh meanwhile (stale) counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def row_of(driver: Any, key_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'#keys tbody tr[data-key="{key_id}"]')


def due_order(driver: Any) -> list[int]:
    """Next-due times of the rows in screen order; the keys out of scope must come last. Read in
    one script: the page may replace the table between two element look-ups."""
    rows = [(state, int(due)) for state, due in driver.execute_script(
        "return [...document.querySelectorAll('#keys tbody tr')].map(r => [r.dataset.state, r.dataset.due]);")]
    states = [s == "out_of_scope" for s, _ in rows]
    assert states == sorted(states), "a key out of scope sorted among the keys in scope"
    return [due for state, due in rows if state != "out_of_scope"]


def test_the_page_in_chromium(fleet: Fleet, page: str, browser: Any, tmp_path: Path) -> None:
    """Cards and rows as seeded; sorting by next due; the filter; a rotation shows up without a
    reload; a key's page shows its history and sinks; a screenshot is saved; no console error."""
    from selenium.webdriver.common.by import By

    browser.get(page + "/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr[data-key]"))
    cards = {c.get_attribute("id"): c.find_element(By.CLASS_NAME, "value").text
             for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    assert cards == {"card-keys_in_scope": "9", "card-due_soon": "2", "card-overdue": "2", "card-in_flight": "0",
                     "card-in_doubt": "1", "card-at_risk": "0", "card-failed": "1", "card-drift": "1",
                     "card-retiring": "0"}
    rows = browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr[data-key]")
    assert len(rows) == 10
    billing = row_of(browser, fleet.keys["billing"])
    assert billing.find_element(By.CSS_SELECTOR, ".result").text == "failed"
    assert "due-overdue" in billing.find_element(By.CSS_SELECTOR, "td.due").get_attribute("class")
    assert "due-week" in row_of(browser, fleet.keys["soon"]).find_element(By.CSS_SELECTOR, "td.due").get_attribute("class")
    assert "due-warn" in row_of(browser, fleet.keys["later"]).find_element(By.CSS_SELECTOR, "td.due").get_attribute("class")
    assert "due-fine" in row_of(browser, fleet.keys["auto"]).find_element(By.CSS_SELECTOR, "td.due").get_attribute("class")
    ledger_sinks = [s.text for s in row_of(browser, fleet.keys["ledger"]).find_elements(By.CSS_SELECTOR, ".sink")]
    assert ledger_sinks == ["memory:primary: fresh", "memory:replica: stale"]
    assert "attempt in_doubt" in row_of(browser, fleet.keys["stuck"]).text
    # A key the policy leaves alone is never due; an empty sink of a key never rotated is no warning
    # (one whose rotation went wrong still is); at 800 px a pill never wraps inside, an alias only
    # between words.
    assert row_of(browser, fleet.keys_sbx).find_element(By.CSS_SELECTOR, "td.due").text == "—"
    pills = "return [...arguments[0].querySelectorAll('.sink')].map(e => e.className);"
    assert browser.execute_script(pills, row_of(browser, fleet.keys["young"])) == ["sink sink-idle"] * 2
    assert browser.execute_script(pills, row_of(browser, fleet.keys["stuck"])) == ["sink sink-empty"] * 2
    browser.set_window_size(800, 900)
    assert browser.execute_script(
        "return [...document.querySelectorAll('.sink, .result, .flight')].every("
        "e => e.getBoundingClientRect().height < 2 * parseFloat(getComputedStyle(e).fontSize));")
    assert browser.execute_script("return getComputedStyle(document.querySelector('td.alias')).overflowWrap") == \
        "break-word"
    browser.set_window_size(1500, 1100)
    assert {r.find_element(By.CSS_SELECTOR, "td.strategy").text for r in rows} == {"reset"}

    # The page refreshes its table while the test runs: each click and read is one script, so no
    # element found in one step is gone (stale) by the next.
    sort_by_due = "document.querySelector('button[data-sort=\"due\"]').click();"
    browser.execute_script(sort_by_due)
    dues = due_order(browser)
    assert dues == sorted(dues) and len(dues) == 9
    assert browser.execute_script(
        "return document.querySelector('button[data-sort=\"due\"]').parentElement.getAttribute('aria-sort');"
    ) == "ascending"
    browser.execute_script(sort_by_due)
    assert due_order(browser) == sorted(dues, reverse=True)

    browser.find_element(By.ID, "filter").send_keys("billing")
    shown = "return [...document.querySelectorAll('#keys tbody tr[data-key]')].filter(r => r.offsetParent !== null)" \
            ".map(r => r.dataset.key);"
    assert browser.execute_script(shown) == [fleet.keys["billing"]]
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "filter").send_keys(" ")  # an input event; blank matches all
    browser.save_screenshot(str(tmp_path / "status-page.png"))
    assert (tmp_path / "status-page.png").stat().st_size > 20_000

    browser.execute_script("document.documentElement.dataset.marker = 'same-page'")
    young = fleet.keys["young"]
    fleet.engine().rotate(KeyRef("acme", young), trigger="manual", force=True, reason="seen live")
    wait_for(lambda: row_of(browser, young).find_elements(By.CSS_SELECTOR, ".result-succeeded"))
    assert browser.execute_script("return document.documentElement.dataset.marker") == "same-page"
    wait_for(lambda: "seen live" in row_of(browser, young).text)
    # the sort survives the refresh
    wait_for(lambda: (dues := due_order(browser)) == sorted(dues, reverse=True))

    row_of(browser, fleet.keys["billing"]).find_element(By.CSS_SELECTOR, "td.key a").click()
    wait_for(lambda: browser.find_elements(By.ID, "history"))
    assert browser.find_element(By.CSS_SELECTOR, "#key-title .alias").text == "billing"
    history = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
    assert [h.get_attribute("data-result") for h in history] == ["failed"]
    assert [s.get_attribute("data-state") for s in browser.find_elements(By.CSS_SELECTOR, "#sinks tbody tr")] == \
        ["empty", "empty"]
    browser.save_screenshot(str(tmp_path / "key-page.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_hostile_aliases_render_as_text_in_chromium(fleet: Fleet, page: str, browser: Any) -> None:
    """An alias holding `<img onerror>` or `</script><script>` shows as those characters, in the
    table and on the key's page: no element is created, nothing runs."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    browser.get(page + "/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr[data-key]"))
    for alias in (IMG, SCRIPT):
        cell = row_of(browser, fleet.keys[alias]).find_element(By.CSS_SELECTOR, "td.alias")
        assert cell.text == alias
        assert cell.find_elements(By.XPATH, "./*") == []
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    for alias in (IMG, SCRIPT):
        browser.get(f"{page}/keys/acme/{fleet.keys[alias]}")
        assert browser.find_element(By.CSS_SELECTOR, "#key-title .alias").text == alias
        assert alias in browser.title
        assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text


def test_a_slow_refresh_is_not_started_again_while_in_flight(fleet: Fleet, browser: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """When a report takes longer than the refresh interval, the page keeps one refresh in flight
    and skips the ticks meanwhile: requests do not pile up behind a slow report."""
    from selenium.webdriver.common.by import By

    gate = threading.Event()
    gate.set()
    real_report = web_source.status_report

    def held_report(engine: Engine, **kwargs: Any) -> dict[str, Any]:
        gate.wait(10)
        return real_report(engine, **kwargs)

    monkeypatch.setattr(web_source, "status_report", held_report)
    source = FleetSource(build_engine(fleet.settings, publisher=Quiet()), cache_s=0)
    inner = create_app(source, refresh_s=0.2)
    pending, most = [0], [0]

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        fragment = scope["type"] == "http" and scope["path"] == "/fragment/fleet"
        pending[0] += fragment
        most[0] = max(most[0], pending[0])
        try:
            await inner(scope, receive, send)
        finally:
            pending[0] -= fragment

    with running(counting) as client:
        browser.get(f"{client.base_url}/")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr[data-key]"))
        wait_for(lambda: most[0] == 1)  # refreshing
        gate.clear()
        try:
            wait_for(lambda: pending[0] == 1, timeout=3)  # one refresh waits for the held report
            time.sleep(0.7)  # three more ticks
            assert most[0] == 1
        finally:
            gate.set()
        wait_for(lambda: pending[0] == 0)
        browser.get("about:blank")
    source.close()
