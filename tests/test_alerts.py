"""Alerts over real HTTP and SMTP: signed webhooks, Apprise, every event type, de-duplication, metrics."""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from rotator.alerts.apprise_notifier import AppriseNotifier
from rotator.alerts.dispatch import DirectPublisher
from rotator.alerts.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignedWebhook, verify_signature
from rotator.config import settings_from_mapping
from rotator.domain import KeyRef
from rotator.embedded import free_port
from rotator.engine import Engine
from rotator.errors import PermanentError, TransientError
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.protocols import Event
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import FP_KEY
from tests.receiver import Receiver

FP = Fingerprinter(FP_KEY)
DAY = 86_400
HOOK_SECRET = "webhook-shared-secret-123"
EVENT = Event("rotation.failed", "error", "acme", "key_1", "Auto-generated key", "PRODUCTION", 91.0,
              "attempt-1", "reset refused", time.time())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_signed_webhook_verifies_and_tampering_is_detected(receiver: Receiver) -> None:
    """The receiver verifies the signature; a changed body, wrong secret or old timestamp fail."""
    SignedWebhook(f"webhook+{receiver.url}/hook", HOOK_SECRET).send(EVENT)
    got = receiver.wait_for(1)[0]
    ts, sig = got.headers[TIMESTAMP_HEADER], got.headers[SIGNATURE_HEADER]
    assert verify_signature(HOOK_SECRET, ts, got.body, sig)
    assert got.json()["event"] == "rotation.failed" and got.json()["severity"] == "error"
    assert not verify_signature(HOOK_SECRET, ts, got.body.replace(b"key_1", b"key_2"), sig)
    assert not verify_signature("another-secret", ts, got.body, sig)
    assert not verify_signature(HOOK_SECRET, ts, got.body, sig, now=int(ts) + 3600)


def test_the_webhook_verifies_with_a_standard_webhooks_library(receiver: Receiver) -> None:
    """An independent implementation of Standard Webhooks (the `standardwebhooks` package) verifies
    the request with the secret's bytes, or the same as `whsec_<base64>`; a changed body, id or
    timestamp fails; a retry of one delivery has the same `webhook-id`, another delivery another."""
    import base64

    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    hook = SignedWebhook(f"webhook+{receiver.url}/hook", HOOK_SECRET)
    hook.send(EVENT)
    hook.send(EVENT)  # a retry of the same delivery
    hook.send(replace(EVENT, time=EVENT.time + 1))
    first, retry, other = receiver.wait_for(3)
    for secret in (HOOK_SECRET.encode(), "whsec_" + base64.b64encode(HOOK_SECRET.encode()).decode()):
        assert Webhook(secret).verify(first.body, first.headers)["event"] == "rotation.failed"
    assert first.headers["webhook-id"] == retry.headers["webhook-id"] != other.headers["webhook-id"]
    verifier = Webhook(HOOK_SECRET.encode())
    for headers, body in (({**first.headers}, first.body.replace(b"key_1", b"key_2")),
                          ({**first.headers, "webhook-id": other.headers["webhook-id"]}, first.body),
                          ({**first.headers, "webhook-timestamp": str(int(first.headers["webhook-timestamp"]) - 1)},
                           first.body)):
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body, headers)
    whsec = "whsec_" + base64.b64encode(b"\x00\x01binary-key-of-16+").decode()  # a secret made for such libraries
    SignedWebhook(f"webhook+{receiver.url}/hook", whsec).send(EVENT)
    assert Webhook(whsec).verify(receiver.wait_for(4)[3].body, receiver.received[3].headers)


def test_the_readme_receiver_verifies_both_kinds_of_secret(receiver: Receiver) -> None:
    """The README's snippet, run as written, for a plain secret and a `whsec_` one; a `whsec_` secret
    that is not base64 of 16 bytes or more is refused."""
    import base64
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(from standardwebhooks import Webhook\n.*?)```", readme, re.S)
    assert snippet is not None
    for index, secret in enumerate((HOOK_SECRET, "whsec_" + base64.b64encode(b"sixteen-or-more-bytes").decode())):
        SignedWebhook(f"webhook+{receiver.url}/hook", secret).send(EVENT)
        got = receiver.wait_for(index + 1)[index]
        scope: dict[str, Any] = {"secret": secret, "raw_body": got.body, "headers": got.headers}
        exec(snippet.group(1), scope)
        assert scope["event"]["key_id"] == "key_1"
    for weak in ("whsec_", "whsec_c2hvcnQ=", "whsec_not base64!"):
        with pytest.raises(PermanentError, match="whsec_"):
            SignedWebhook(f"webhook+{receiver.url}/hook", weak)


def test_only_a_2xx_answer_is_a_delivery(receiver: Receiver) -> None:
    """A redirect (not followed) or any other answer outside 2xx is no delivery."""
    receiver.answers = [302]
    with pytest.raises(PermanentError, match="302 .only a 2xx answer is a delivery"):
        SignedWebhook(f"webhook+{receiver.url}/hook", HOOK_SECRET).send(EVENT)


def test_the_webhook_secret_may_come_from_a_file(tmp_path: Any, receiver: Receiver) -> None:
    from standardwebhooks import Webhook

    from rotator.alerts.dispatch import routes
    from rotator.errors import ConfigError

    def config(secret_file: Any) -> Any:
        return settings_from_mapping({
            "keyservice": {"kind": "emulator"}, "engine": {"fingerprint_key_env": "FP"}, "sinks": [{"kind": "memory"}],
            "alerts": [{"url": f"webhook+{receiver.url}/hook", "secret_file": str(secret_file)}]},
            environ={"FP": "x" * 32})

    with pytest.raises(ConfigError, match=r"alerts\[0\]\.secret_file: webhook secret: .* does not exist"):
        config(tmp_path / "missing")
    (tmp_path / "weak.secret").write_text("whsec_c2hvcnQ=\n")  # base64 of 5 bytes
    with pytest.raises(ConfigError, match=r"alerts\[0\]\.secret_env: webhook secret: a whsec_ webhook secret must "
                                          r"decode to at least 16 bytes"):
        config(tmp_path / "weak.secret")
    (tmp_path / "hook.secret").write_text(HOOK_SECRET + "\n")
    routes(config(tmp_path / "hook.secret"))[0].notifier().send(EVENT)
    got = receiver.wait_for(1)[0]
    assert Webhook(HOOK_SECRET.encode()).verify(got.body, got.headers)["key_id"] == "key_1"


def test_an_alert_url_with_a_credential_comes_from_a_file_or_a_variable(tmp_path: Any, receiver: Receiver) -> None:
    """`url_file` / `url_env` hold a URL with its credential (here json://user:password@…, which
    Apprise masks): the alert is delivered with it, while the same URL inline is refused."""
    from rotator.alerts.dispatch import routes
    from rotator.errors import ConfigError

    port = receiver.url.rsplit(":", 1)[1]
    url = f"json://ops:pa55-w0rd-9@127.0.0.1:{port}/apprise"
    base = {"keyservice": {"kind": "emulator"}, "engine": {"fingerprint_key_env": "FP"}, "sinks": [{"kind": "memory"}]}
    (tmp_path / "alert.url").write_text(url + "\n")
    with pytest.raises(ConfigError, match=r"alerts\[0\]\.url: holds a password or a token inline") as refused:
        settings_from_mapping({**base, "alerts": [{"url": url}]}, environ={"FP": "x" * 32})
    assert "pa55-w0rd-9" not in str(refused.value)
    for alert, environ in (({"url_file": str(tmp_path / "alert.url")}, {}), ({"url_env": "HOOK_URL"}, {"HOOK_URL": url})):
        os.environ.update(environ)
        try:
            routes(settings_from_mapping({**base, "alerts": [alert]}, environ={"FP": "x" * 32, **environ}))[0] \
                .notifier().send(EVENT)
        finally:
            for name in environ:
                os.environ.pop(name)
    first, second = receiver.wait_for(2)
    assert first.headers["Authorization"].startswith("Basic ") and "rotation.failed" in first.json()["title"]
    assert second.headers["Authorization"] == first.headers["Authorization"]


def test_webhook_5xx_is_transient(receiver: Receiver) -> None:
    """A receiver answering 500 makes the send retryable."""
    receiver.answers = [500]
    with pytest.raises(TransientError, match="500"):
        SignedWebhook(f"webhook+{receiver.url}/hook", HOOK_SECRET).send(EVENT)


def test_apprise_json_to_a_local_endpoint(receiver: Receiver) -> None:
    """An Apprise json:// URL posts the event, its name verbatim in the title."""
    port = receiver.url.rsplit(":", 1)[1]
    AppriseNotifier(f"json://127.0.0.1:{port}/apprise").send(EVENT)
    body = receiver.wait_for(1)[0].json()
    assert "rotation.failed" in body["title"] and "rotation.failed" in body["message"]


def test_apprise_email_to_a_local_smtp_server() -> None:
    """An Apprise mailto:// URL delivers an e-mail naming the event to a local SMTP server."""
    messages: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            messages.append(envelope.content)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        AppriseNotifier(f"mailto://127.0.0.1:{port}?from=rotator@example.com&to=ops@example.com&mode=insecure"
                        ).send(EVENT)
    finally:
        controller.stop()
    assert len(messages) == 1 and b"rotation.failed" in messages[0]


def test_apprise_rejects_an_unknown_url() -> None:
    """A URL Apprise does not know is refused without echoing it."""
    from rotator.errors import PermanentError

    with pytest.raises(PermanentError) as info:
        AppriseNotifier("nosuchscheme://token@host")
    assert "token" not in str(info.value)


# --- every event, from a real cause, to a real receiver ------------------------------------

def engine_with_webhook(keyservice: HttpKeyService, state: RedisState, url: str,
                        monkeypatch: pytest.MonkeyPatch, **alert: Any) -> tuple[Engine, Any]:
    monkeypatch.setenv("HOOK_SECRET", HOOK_SECRET)
    monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", "x")
    monkeypatch.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    settings = settings_from_mapping({"sinks": [{"kind": "memory"}],
                                      "alerts": [{"url": f"webhook+{url}/hook", "secret_env": "HOOK_SECRET", **alert}]})
    sink: Any = registry.build("memory", {}, FP)
    from rotator.policy import Policy

    engine = Engine(keyservice, [sink], state, DirectPublisher(settings, state), FP, Policy(), sink_retry_s=0.5)
    return engine, sink


def test_every_event_type_is_caused_and_received(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each of the seven events comes from a real cause and reaches the receiver, signed, secret-free."""
    now = emulator.now()
    auto = next(iter(emulator.add_client("acme", created_at=now - 400 * DAY).keys))
    soon = emulator.add_key("acme", "soon", created_at=now - 80 * DAY).id
    failing = emulator.add_key("acme", "failing", created_at=now - 100 * DAY).id
    risky = emulator.add_key("acme", "risky", created_at=now - 100 * DAY).id
    engine, sink = engine_with_webhook(keyservice, state, receiver.url, monkeypatch)

    assert engine.rotate(KeyRef("acme", auto), trigger="test").status == "succeeded"      # rotation.succeeded
    emulator.add_fault(Fault(method="POST", path=f"{failing}/reset$", status=403, times=10))
    assert engine.rotate(KeyRef("acme", failing), trigger="test").status == "failed"      # rotation.failed
    emulator.clear_faults()
    sink.fail_next = [TransientError("memory: injected outage")] * 50
    assert engine.rotate(KeyRef("acme", risky), trigger="test").status == "at_risk"       # rotation.secret_at_risk
    sink.fail_next = []
    assert [r.status for r in engine.recover_all()] == ["recovered"]                     # rotation.recovered
    engine.warn(time.time())                                                              # key.due_soon, key.overdue
    emulator.clock_offset_s = 10
    keyservice.reset_key("acme", auto, "reset-behind-our-back-1")
    assert engine.drift()                                                                 # drift.detected
    expected = {"rotation.succeeded", "rotation.failed", "rotation.secret_at_risk", "rotation.recovered",
                "key.due_soon", "key.overdue", "drift.detected"}
    got = receiver.wait_for(len(expected))
    assert set(receiver.events()) == expected
    assert {r.json()["event"] for r in got if r.json()["key_id"] == soon} == {"key.due_soon"}
    secrets_seen = {emulator.current_secret("acme", k) for k in (auto, failing, risky, soon)}
    for r in got:
        assert verify_signature(HOOK_SECRET, r.headers[TIMESTAMP_HEADER], r.body, r.headers[SIGNATURE_HEADER])
        assert not any(s.encode() in r.body for s in secrets_seen)
        assert set(r.json()) >= {"event", "severity", "client_id", "key_id", "alias", "environment", "age_days",
                                 "attempt_id", "error", "time"}


def test_two_sweeps_in_a_day_send_one_due_soon_alert(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """De-duplication: the same event for the same key is sent once within the window."""
    now = emulator.now()
    emulator.add_client("acme", created_at=now - 80 * DAY)
    engine, _ = engine_with_webhook(keyservice, state, receiver.url, monkeypatch, events=["key.due_soon"])
    assert engine.warn(time.time())["due_soon"] == 1
    assert engine.warn(time.time())["due_soon"] == 1
    time.sleep(0.5)
    assert receiver.events() == ["key.due_soon"]


def test_min_severity_and_event_filters(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A channel with min_severity=error hears no warning-level due-soon event."""
    now = emulator.now()
    emulator.add_client("acme", created_at=now - 80 * DAY)
    engine, _ = engine_with_webhook(keyservice, state, receiver.url, monkeypatch, min_severity="error")
    engine.warn(time.time())
    time.sleep(0.3)
    assert receiver.events() == []


# --- metrics --------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, list[Any]]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_during_and_after_a_run(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, monkeypatch: pytest.MonkeyPatch,
    emulator_server: Any,
) -> None:
    """Scraped mid-run and after: counters, histogram, ages and at-risk match the state."""
    from rotator.metrics import serve

    now = emulator.now()
    emulator.add_client("acme", created_at=now - 400 * DAY)
    for i in range(4):
        emulator.add_key("acme", f"k{i}", created_at=now - 100 * DAY)
    engine, _ = engine_with_webhook(keyservice, state, "http://127.0.0.1:9", monkeypatch)
    monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", emulator.token)
    settings = settings_from_mapping({
        "keyservice": {"url": emulator_server.url},
        "state": {"redis_url": state.client.connection_pool.connection_kwargs and
                  f"redis://127.0.0.1:{state.client.connection_pool.connection_kwargs['port']}/0",
                  "namespace": state.ns},
        "sinks": [{"kind": "memory"}]})
    port = free_port()
    server = serve(settings, port, "127.0.0.1", cache_s=0)
    server = server[0] if isinstance(server, tuple) else server
    try:
        emulator.latency_s = 0.05
        keys = [k.key_id for k in keyservice.list_keys("acme")]
        worker = threading.Thread(target=lambda: [engine.rotate(KeyRef("acme", k), trigger="test") for k in keys])
        worker.start()
        time.sleep(0.4)
        during = scrape(port)
        worker.join()
        after = scrape(port)
        # DNS rebinding: a page elsewhere that resolves its own name to 127.0.0.1 gets nothing
        rebound = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        rebound.request("GET", "/metrics", headers={"Host": f"attacker.example:{port}"})
        answer = rebound.getresponse()
        assert answer.status == 421 and b"rotator_" not in answer.read()
        scraper = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # Prometheus sends the address
        scraper.request("GET", "/metrics", headers={"Host": f"10.1.2.3:{port}"})
        assert scraper.getresponse().status == 200
    finally:
        server.shutdown()
    done_during = sum(s.value for s in during["rotator_rotations"] if s.labels["result"] == "succeeded")
    assert 0 <= done_during <= 5
    assert sum(s.value for s in after["rotator_rotations"] if s.labels["result"] == "succeeded") == 5
    count = next(s.value for s in after["rotator_rotation_duration_seconds"]
                 if s.name == "rotator_rotation_duration_seconds_count")
    assert count == 5
    assert all(set(s.labels) == {"client_id", "key_id", "environment"} for s in after["rotator_key_age_seconds"])
    ages = {s.labels["key_id"]: s.value for s in during["rotator_key_age_seconds"]}
    assert set(ages) == set(keys) and all(a > 99 * DAY or a < 60 for a in ages.values())
    assert all(s.value < 60 for s in after["rotator_key_age_seconds"])
    assert after["rotator_secrets_at_risk"][0].value == 0
    assert len(after["rotator_key_next_due_timestamp_seconds"]) == 5


def test_a_worker_killed_mid_send_does_not_turn_the_redelivered_alert_into_a_duplicate(
    state: RedisState, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The `notify` task claims its de-duplication slot only after the send succeeded: a worker
    that dies while sending leaves the slot free, so the redelivered message is sent, and only a
    delivery after a successful one is a duplicate."""
    from types import SimpleNamespace

    import rotator.tasks as tasks
    from rotator.alerts.dispatch import Route

    monkeypatch.setenv("HOOK_SECRET", HOOK_SECRET)
    monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", "x")
    monkeypatch.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    (tmp_path / "rotator.toml").write_text('[[sinks]]\nkind = "memory"\n')
    monkeypatch.setenv("ROTATOR_CONFIG", str(tmp_path / "rotator.toml"))  # Celery's own settings
    settings = settings_from_mapping({"sinks": [{"kind": "memory"}],
                                      "alerts": [{"url": f"webhook+{receiver.url}/hook", "secret_env": "HOOK_SECRET"}]})
    monkeypatch.setattr(tasks, "settings", lambda: settings)
    monkeypatch.setattr(tasks, "engine", lambda: SimpleNamespace(state=state))

    class Killed(BaseException):
        pass

    real = Route.notifier
    dying = [True]

    def notifier(self: Route) -> Any:
        if dying and dying.pop():
            return SimpleNamespace(send=lambda event: (_ for _ in ()).throw(Killed()))
        return real(self)

    monkeypatch.setattr(Route, "notifier", notifier)
    event = Event("rotation.secret_at_risk", "critical", "acme", "k1", attempt_id="a1", time=time.time()).to_dict()
    with pytest.raises(Killed):
        tasks.notify(0, event)  # the worker dies inside the send
    assert tasks.notify(0, event) == "sent"  # the redelivered message
    assert tasks.notify(0, event) == "duplicate"
    assert [r.json()["event"] for r in receiver.wait_for(1)] == ["rotation.secret_at_risk"]
