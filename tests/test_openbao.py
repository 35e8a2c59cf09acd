"""The Vault sink against a real Vault API: a private OpenBao dev server, set up as
docs/operations.md tells an operator (AppRole, the doc's least-privilege policy, KV v2 at a
non-default mount). Each capability the policy grants is taken away in turn: the missing one is
named by `check-config --ping` and by the rotation's pre-flight, and the key is never reset."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rotator import logs
from rotator.cli import app
from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.errors import AuthenticationError, ForbiddenError, TransientError, WriteConflictError
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.openbao import PrivateOpenBao, approle_login
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.sinks.base import document
from rotator.sinks.vault import vault_policy
from rotator.state import RedisState
from tests.conftest import FP_KEY, doc_policy, write_config
from tests.test_sinks import make_key, make_record

FP = Fingerprinter(FP_KEY)
DAY = 86_400

# (path kind, capability, whether the path already holds a secret when the rotation starts)
MISSING = [
    ("data", "create", False),
    ("data", "update", True),
    ("data", "read", False),
    ("metadata", "read", False),
    ("metadata", "update", False),
]


def without(policy: str, kind: str, capability: str) -> str:
    """The policy with one capability taken off one of its two paths."""
    lines = policy.splitlines()
    index = next(i for i, line in enumerate(lines) if f"/{kind}/" in line)
    held = lines[index].split("[", 1)[1].split("]", 1)[0]
    kept = ", ".join(c for c in (s.strip() for s in held.split(",")) if c != f'"{capability}"')
    lines[index] = lines[index].replace(f"[{held}]", f"[{kept}]")
    assert lines[index] != policy.splitlines()[index], "the doc's policy no longer grants this"
    return "\n".join(lines) + "\n"


@pytest.fixture
def due(emulator: Emulator) -> str:
    now = emulator.now()
    return next(iter(emulator.add_client("acme", "Acme", created_at=now - 400 * DAY).keys))


def sink_for(bao_sink: dict[str, Any], openbao: PrivateOpenBao, policy: str | None = None,
             monkeypatch: pytest.MonkeyPatch | None = None, **role: Any) -> Any:
    """The sink of `bao_sink`, or one logged in under a role of its own holding `policy` (its ids
    in variables of its own)."""
    if policy is None:
        return registry.build("vault", bao_sink, FP)
    assert monkeypatch is not None
    name = f"r-{uuid.uuid4().hex[:8]}"
    login = approle_login(openbao.client(), mount=bao_sink["mount"], policy=policy, role=name, **role)
    suffix = name.upper().replace("-", "_")
    monkeypatch.setenv(f"ROLE_ID_{suffix}", login.role_id)
    monkeypatch.setenv(f"SECRET_ID_{suffix}", login.secret_id)
    return registry.build("vault", {**bao_sink, "role_id_env": f"ROLE_ID_{suffix}",
                                    "secret_id_env": f"SECRET_ID_{suffix}"}, FP)


def engine_for(keyservice: HttpKeyService, state: RedisState, sink: Any, **kw: Any) -> tuple[Engine, CapturePublisher]:
    events = CapturePublisher()
    return Engine(keyservice, [sink], state, events, FP, Policy(), **kw), events


def credentials(openbao: PrivateOpenBao) -> list[str]:
    """The root token and every role and secret id the test set."""
    import os

    return [openbao.root_token, *(v for k, v in os.environ.items() if k.startswith(("ROLE_ID", "SECRET_ID")))]


def test_the_docs_policy_is_the_one_the_code_names() -> None:
    """The policy tests run under is read from docs/operations.md; the code's own rendering of it
    (the demo's) is the same text, so neither can drift from the doc."""
    assert doc_policy("secret", "rotator") == vault_policy("secret", "rotator/{client_id}/{key_id}")
    assert doc_policy("kv", "teams/payments") == vault_policy("kv", "teams/payments/{client_id}/{alias}")


def test_the_docs_policy_rotates_and_rotates_again(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str,
) -> None:
    """With exactly the doc's policy, under AppRole, at a non-default mount: ping passes, two
    rotations of one key land (the second is the one that needs `update`), and `bao kv get`
    reads the current secret and the metadata back."""
    sink = sink_for(bao_sink, openbao)
    sink.ping()
    engine, _ = engine_for(keyservice, state, sink)
    for forced in (False, True):
        result = engine.rotate(KeyRef("acme", due), trigger="test", force=forced)
        assert result.status == "succeeded", result.reason
    out = openbao.cli("kv", "get", "-format=json", f"-mount={bao_sink['mount']}", f"rotator/acme/{due}")
    answer = json.loads(out.stdout)
    assert answer["data"]["data"]["api_key"] == emulator.current_secret("acme", due)
    assert answer["data"]["metadata"]["version"] == 2
    assert answer["data"]["metadata"]["custom_metadata"]["fingerprint"] == FP(emulator.current_secret("acme", due))
    assert len(emulator.ledger) == 2


@pytest.mark.parametrize(("kind", "capability", "exists"), MISSING, ids=[f"{k}-{c}" for k, c, _ in MISSING])
def test_a_missing_capability_is_named_before_any_reset(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, emulator_server: EmulatorServer,
    keyservice: HttpKeyService, state: RedisState, due: str, redis_server: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, env: pytest.MonkeyPatch, kind: str, capability: str, exists: bool,
) -> None:
    """Each capability of the doc's policy, taken away: `check-config --ping` fails naming it and
    the path; the rotation fails in its pre-flight with one line naming it; the key service was
    never asked to reset; no credential appears in either."""
    if exists:  # an earlier rotation's document (written with the full policy)
        full = sink_for(bao_sink, openbao)
        key = keyservice.get_key("acme", due)
        full.write(make_record(replace(key, last_reset_at=key.born_at - 1)))
        full.close()
    policy = without(doc_policy(bao_sink["mount"], "rotator"), kind, capability)
    sink = sink_for(bao_sink, openbao, policy, monkeypatch)
    secrets = credentials(openbao)

    settings = {"kind": "vault", **bao_sink, "role_id_env": sink.config.role_id_env,
                "secret_id_env": sink.config.secret_id_env}
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server,
                          sinks="\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()))
    result = CliRunner().invoke(app, ["check-config", "--ping", "--config", str(config)])
    wanted = f"lacks '{capability}' on {bao_sink['mount']}/{kind}/rotator/"
    assert result.exit_code == 1 and wanted in result.stderr, result.stderr

    engine, events = engine_for(keyservice, state, sink)
    outcome = engine.rotate(KeyRef("acme", due), trigger="test")
    assert outcome.status == "failed"
    assert f"lacks '{capability}' on {bao_sink['mount']}/{kind}/rotator/acme/{due}" in outcome.reason
    assert "the key was not reset" in outcome.reason and "\n" not in outcome.reason
    assert emulator.ledger == []
    shown = result.stderr + outcome.reason + json.dumps([e.to_dict() for e in events.events])
    assert not [s for s in secrets if s in shown]


def test_a_role_without_the_default_policy_is_named(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`token_no_default_policy`: the token may not ask what it may do. Ping and prepare say the
    role needs the `default` policy, before any reset."""
    sink = sink_for(bao_sink, openbao, doc_policy(bao_sink["mount"], "rotator"), monkeypatch, default_policy=False)
    with pytest.raises(ForbiddenError) as info:
        sink.prepare(make_key())
    assert "sys/capabilities-self" in str(info.value) and "`default` policy" in str(info.value)
    sink.close()
    with pytest.raises(ForbiddenError) as pinged:
        sink.ping()
    assert "auth/token/lookup-self" in str(pinged.value) and "`default` policy" in str(pinged.value)


def test_a_refused_login_is_named_not_retried(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mistyped `approle_mount` (or a wrong secret id): the login itself is refused. Ping and
    the rotation's pre-flight say so, naming the mount, as a permanent error: no retry, no reset,
    no id in the message."""
    monkeypatch.setenv("WRONG_SECRET_ID", "00000000-0000-0000-0000-000000000000")
    for settings in ({**bao_sink, "approle_mount": "approle-typo"}, {**bao_sink, "secret_id_env": "WRONG_SECRET_ID"}):
        sink = registry.build("vault", settings, FP)
        with pytest.raises(AuthenticationError) as info:
            sink.ping()
        assert f"login at auth/{settings.get('approle_mount', 'approle')}/login refused" in str(info.value), info.value
        outcome = engine_for(keyservice, state, sink)[0].rotate(KeyRef("acme", due), trigger="test")
        assert outcome.status == "failed" and "login" in outcome.reason and "refused" in outcome.reason
        assert not [v for v in credentials(openbao) if v in str(info.value) + outcome.reason]
    assert emulator.ledger == []


def test_a_path_with_metadata_and_no_version_needs_update(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator set the path's metadata up first (`bao kv metadata put -max-versions=5`): no
    version yet, but Vault writes it with `update`. Without `update` the pre-flight says so
    before the reset, instead of checking `create` and failing the write after it."""
    openbao.cli("kv", "metadata", "put", "-max-versions=5", f"-mount={bao_sink['mount']}", f"rotator/acme/{due}")
    sink = sink_for(bao_sink, openbao, without(doc_policy(bao_sink["mount"], "rotator"), "data", "update"),
                    monkeypatch)
    outcome = engine_for(keyservice, state, sink)[0].rotate(KeyRef("acme", due), trigger="test")
    assert outcome.status == "failed", outcome.reason
    assert f"lacks 'update' on {bao_sink['mount']}/data/rotator/acme/{due}" in outcome.reason, outcome.reason
    assert emulator.ledger == []
    full = sink_for(bao_sink, openbao)
    assert engine_for(keyservice, state, full)[0].rotate(KeyRef("acme", due), trigger="test").status == "succeeded"


def test_a_403_under_a_fresh_login_is_a_refusal_not_a_login_problem(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A policy without `update`, a path that holds a secret, a write without the pre-flight: the
    403 comes under a token issued for this very call, so it is the policy's answer (ForbiddenError
    naming the capability), not a retry; a token revoked after its login is logged in again once."""
    key = make_key()
    full = sink_for(bao_sink, openbao)
    full.write(make_record(key))
    later = replace(key, last_reset_at=key.last_reset_at + 1)
    with pytest.raises(ForbiddenError, match=f"needs 'update' on {bao_sink['mount']}/data/"):
        sink_for(bao_sink, openbao, without(doc_policy(bao_sink["mount"], "rotator"), "data", "update"),
                 monkeypatch).write(make_record(later))

    token = full._client.token
    openbao.client().auth.token.revoke(token)
    with pytest.raises(TransientError, match="logging in again"):
        full.write(make_record(later))
    full.write(make_record(later))  # logged in afresh
    assert full.read_state(later) is not None


def test_cas_refuses_a_write_when_another_writer_wrote_in_between(
    openbao: PrivateOpenBao, bao_sink: dict[str, Any],
) -> None:
    """prepare reads version 1; another writer adds version 2; our write (CAS on 1) is refused
    with nothing overwritten; written again it lands as version 3 and version 2 stays readable."""
    sink = sink_for(bao_sink, openbao)
    key = make_key()
    sink.write(make_record(key))
    later = replace(key, last_reset_at=key.last_reset_at + 1)
    prepared = sink.prepare(later)
    other = make_record(later)
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=f"rotator/{key.client_id}/{key.key_id}", secret=document(other), mount_point=bao_sink["mount"])
    ours = make_record(later)
    with pytest.raises(WriteConflictError, match="another writer"):
        sink.write(ours, prepared)
    assert sink.read_version(later, 2)["api_key"] == other.secret.reveal()
    assert sink.read_state(later).fingerprint == other.fingerprint  # type: ignore[union-attr]
    sink.write(ours)
    assert sink.metadata(later)["current_version"] == 3
    assert sink.read_version(later, 2)["api_key"] == other.secret.reveal()


@pytest.fixture
def sealed_or_frozen(openbao: PrivateOpenBao) -> Iterator[PrivateOpenBao]:
    """The shared server, always unsealed and running again after the test."""
    yield openbao
    openbao.thaw()
    if openbao.client().sys.read_seal_status()["sealed"]:
        openbao.unseal()


@pytest.mark.parametrize("fault", ["sealed", "frozen"])
def test_a_server_down_during_prepare_means_no_reset(
    sealed_or_frozen: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str, fault: str,
) -> None:
    """Sealed (`bao operator seal`) or frozen (SIGSTOP) before the rotation: the pre-flight fails,
    the key is not reset; once the server is back the rotation lands."""
    openbao = sealed_or_frozen
    sink = sink_for(bao_sink, openbao)
    sink.ping()
    if fault == "sealed":
        openbao.cli("operator", "seal")
    else:
        sink.close()
        openbao.freeze()
    engine, _ = engine_for(keyservice, state, sink)
    outcome = engine.rotate(KeyRef("acme", due), trigger="test")
    assert outcome.status == "failed" and "not ready" in outcome.reason, outcome.reason
    assert ("sealed" if fault == "sealed" else "Timeout") in outcome.reason, outcome.reason
    assert emulator.ledger == []
    openbao.thaw()
    if fault == "sealed":
        openbao.unseal()
    assert engine.rotate(KeyRef("acme", due), trigger="test").status == "succeeded"
    assert sink.read_secret(keyservice.get_key("acme", due)).reveal() == emulator.current_secret("acme", due)  # type: ignore[union-attr]


@pytest.mark.parametrize("fault", ["sealed", "frozen"])
def test_a_server_down_during_the_write_is_recovered_once_back(
    sealed_or_frozen: PrivateOpenBao, bao_sink: dict[str, Any], emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str, fault: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The server goes down between the reset and the write: the secret is at risk (reported, not
    lost); once the server is back the recovery sweep replays it from the key service into Vault.
    One reset; no token, secret id or secret in any error, event or log line."""
    openbao = sealed_or_frozen
    sink = sink_for(bao_sink, openbao)
    reset = keyservice.reset_key

    def reset_then_down(*args: Any, **kwargs: Any) -> Any:
        answer = reset(*args, **kwargs)
        if fault == "sealed":
            openbao.seal()
        else:
            openbao.freeze()
        return answer

    monkeypatch.setattr(keyservice, "reset_key", reset_then_down)
    logs.configure("DEBUG", json_lines=True)
    caplog.set_level(logging.DEBUG)
    engine, events = engine_for(keyservice, state, sink, sink_retry_s=1.0)
    try:
        outcome = engine.rotate(KeyRef("acme", due), trigger="test")
    finally:
        logs.configure("WARNING")
    assert outcome.status == "at_risk", outcome.reason
    assert "rotation.secret_at_risk" in events.names()
    monkeypatch.setattr(keyservice, "reset_key", reset)
    openbao.thaw()
    if fault == "sealed":
        openbao.unseal()
    recovered = engine.recover_all()
    assert [r.status for r in recovered] == ["recovered"], [r.reason for r in recovered]
    assert len(emulator.ledger) == 1
    secret = emulator.current_secret("acme", due)
    assert sink.read_secret(keyservice.get_key("acme", due)).reveal() == secret  # type: ignore[union-attr]
    shown = outcome.reason + caplog.text + json.dumps([e.to_dict() for e in events.events])
    assert not [s for s in [secret, *credentials(openbao)] if s in shown]


def documented_fields() -> set[str]:
    """The stored document's fields as docs/configuration.md lists them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = text.split("| field | holds |", 1)[1].split("\n\n", 1)[0]
    return {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}


def documented_metadata() -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    sentence = text.split("with `custom_metadata`", 1)[1].split("(strings;", 1)[0]
    return {part.strip(" `,\n") for part in sentence.split(",")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reset", "overlap", "overlap-published"])
def test_one_rotation_per_strategy_through_celery_workers_into_openbao(
    strategy: str, tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    keyservice: HttpKeyService, openbao: PrivateOpenBao, bao_sink: dict[str, Any],
) -> None:
    """A real worker and beat, the private Redis, the emulator and OpenBao under AppRole and the
    doc's policy: the due key is rotated by the strategy (overlap: a successor, the old key revoked
    after a 3 s grace; overlap-published: the same against the contract as published, the new key
    `payouts--r1` at the base alias's place; reset: a signed reload call reaches the application),
    and `bao kv get` reads back a document whose fields and metadata are the ones
    docs/configuration.md lists, holding the secret the key service accepts now."""
    from tests.receiver import Receiver
    from tests.test_celery import Cluster, wait_for

    overlap, published = strategy.startswith("overlap"), strategy == "overlap-published"
    emulator.successors = not published
    now = emulator.now()
    emulator.add_client("acme-prod", "Acme", created_at=now - 10 * DAY)
    old = emulator.add_key("acme-prod", "payouts", created_at=now - 95 * DAY).id
    field = "{base_alias}" if published else "{alias}"
    path = f"rotator/{{client_id}}/{field}" if overlap else "rotator/{client_id}/{key_id}"
    app = Receiver().__enter__()
    cluster = Cluster(tmp_path, redis_server, emulator_server.url, openbao.url, "unused",
                      vault={**bao_sink, "path": path},
                      policy='strategy = "overlap"\noverlap_grace_s = 3' if overlap else "",
                      file_path=f"{{client_id}}/{field}.secret" if overlap else "{client_id}/{key_id}.secret",
                      extra="" if overlap else f'[[reload]]\nkind = "http"\nurl = "{app.url}/reload"\n'
                                                'secret_env = "HOOK_SECRET"')
    cluster.env["ROTATOR_KEYSERVICE__SUCCESSORS"] = "false" if published else "true"

    def current() -> str:
        keys = [k for k in keyservice.list_keys("acme-prod") if k.alias.startswith("payouts")]
        return keys[0].key_id if len(keys) == 1 else ""

    def bao_get(*args: str) -> dict[str, Any]:
        where = path.replace("{client_id}", "acme-prod").replace("{alias}", "payouts").replace(
            "{base_alias}", "payouts").replace("{key_id}", current())
        out = openbao.cli("kv", *args, "-format=json", f"-mount={bao_sink['mount']}", where)
        answer: dict[str, Any] = json.loads(out.stdout)["data"]
        return answer

    def done() -> bool:
        if overlap and current() in ("", old):  # the successor is stored and the old key revoked
            return False
        if not overlap and not emulator.ledger:
            return False
        try:
            return bool(bao_get("get")["data"]["api_key"] == emulator.current_secret("acme-prod", current()))
        except Exception:
            return False

    try:
        cluster.worker()
        cluster.start("beat", "--schedule", str(tmp_path / "beat"))
        wait_for(done, 60, f"the {strategy} rotation stored in OpenBao")
        if not overlap:  # the reload hook ran once the secret was in every sink
            [told] = app.wait_for(1)
            assert told.json()["key_id"] == old and told.headers["X-Rotator-Event"] == "secret.stored"
    finally:
        cluster.stop()
        app.__exit__()
    stored = bao_get("get")
    assert set(stored["data"]) == documented_fields() - (set() if overlap else {"replaces"})  # a reset replaces none
    doc = stored["data"]
    assert (doc["client_id"], doc["key_id"], doc["alias"], doc["base_alias"], doc["environment"]) == (
        "acme-prod", current(), "payouts--r1" if published else "payouts", "payouts", "PRODUCTION")
    assert doc["rotated_at"].endswith("Z")
    assert set(stored["metadata"]["custom_metadata"]) == documented_metadata()
    assert stored["metadata"]["custom_metadata"]["fingerprint"] == FP(emulator.current_secret("acme-prod", current()))
    assert bao_get("metadata", "get")["max_versions"] == 10
    assert len(emulator.ledger) == (0 if overlap else 1)
    assert (current() != old) is overlap
    written = cluster.everything_written()
    assert emulator.current_secret("acme-prod", current()) not in written
    assert not [r for r in app.attempts if emulator.current_secret("acme-prod", current()) in r.body.decode()]
    assert not [s for s in credentials(openbao) if s in written]
