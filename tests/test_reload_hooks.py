"""Reload hooks: once every sink holds a key's new secret, its consumers are told. After a reset of
the Auto-generated key (which cannot overlap: its old secret dies at once), a signed POST reaches a
real HTTP receiver and a rollout restart reaches a real HTTP server standing in for the Kubernetes
API, whose patch applied to a Deployment, and the RBAC that allows it, validate offline against the
Kubernetes schemas. A failing hook is `reload.failed`, never a failed rotation or a lost secret."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.fernet import Fernet

from rotator import reload
from rotator.budget import RateBudget
from rotator.config import ConfigError, settings_from_mapping
from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import redis_text
from tests.crashes import Crash, Dies
from tests.receiver import Receiver
from tests.test_engine import FP

DAY = 86_400
HOOK_SECRET = "reload-hook-secret-0123456789"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def auto(emulator: Emulator) -> str:
    now = emulator.now()
    client = emulator.add_client("acme", "Acme", created_at=now - 100 * DAY)
    return next(iter(client.keys))


@pytest.fixture
def file_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    return registry.build("file", {"dir": str(tmp_path / "secrets"), "path": "{client_id}/{base_alias}.secret"}, FP)


def engine_with(hooks: list[Any], keyservice: HttpKeyService, state: RedisState, sink: Any,
                ) -> tuple[Engine, CapturePublisher, list[float]]:
    events, slept = CapturePublisher(), []
    engine = Engine(keyservice, [sink], state, events, FP, Policy(strategy="overlap"),
                    reload=lambda told: reload.run_all(hooks, told, sleep=slept.append))
    return engine, events, slept


def test_a_signed_reload_call_follows_the_reset_of_the_auto_generated_key(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
) -> None:
    from standardwebhooks import Webhook

    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5, aliases=["Auto-generated key"])
    other = reload.HttpReload(f"{receiver.url}/other", HOOK_SECRET, 5, clients=["another-client"])
    engine, events, _ = engine_with([hook, other], keyservice, state, file_sink)
    result = engine.rotate(KeyRef("acme", auto), trigger="schedule")
    assert result.status == "succeeded", result.reason
    assert result.reload == {f"reload {receiver.url}/…": "ok"}  # the other hook is for another client; no path shown
    [call] = receiver.wait_for(1)
    secret = emulator.current_secret("acme", auto)
    told = Webhook(HOOK_SECRET.encode()).verify(call.body, call.headers)
    assert call.path == "/admin/reload" and call.headers["X-Rotator-Event"] == "secret.stored"
    assert (told["client_id"], told["key_id"], told["base_alias"], told["replaces"]) == \
        ("acme", auto, "Auto-generated key", None)
    assert told["key_reset_at"] == emulator.get_key("acme", auto)["LastResetDate"]
    assert file_sink.read_secret(engine.keyservice.get_key("acme", auto)).reveal() == secret  # stored before told
    [entry] = [e for e in state.history() if e.get("kind") == "reload"]  # after the rotation's own entry
    assert (entry["reload"], entry["attempt_id"], entry["status"]) == (result.reload, result.attempt_id, "succeeded")
    assert [e["kind"] for e in state.history()][:2] == ["reload", "rotation"]  # newest first
    everything = [call.body.decode(), json.dumps(call.headers), json.dumps(result.to_dict()),
                  json.dumps([e.to_dict() for e in events.events]), redis_text(state.client)]
    assert not any(secret in text for text in everything)


def test_a_failing_hook_is_an_alert_and_the_rotation_stands(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
) -> None:
    """503 three times (tried with 1 s, then 2 s between), or a 404 (not tried again): the rotation
    succeeded, the secret is in the sink, and `reload.failed` says which hook and why."""
    receiver.answers = [503, 503, 503, 404]
    flaky = reload.HttpReload(f"{receiver.url}/flaky", HOOK_SECRET, 5)
    gone = reload.HttpReload(f"{receiver.url}/gone", HOOK_SECRET, 5)
    engine, events, slept = engine_with([flaky, gone], keyservice, state, file_sink)
    result = engine.rotate(KeyRef("acme", auto), trigger="schedule")
    assert result.status == "succeeded", result.reason
    shown = f"reload {receiver.url}/…"  # a path may hold a token: never shown
    assert result.reload == {shown: f"failed: {shown}: 503", f"{shown} #2": f"failed: {shown}: 404"}
    assert slept == [1.0, 2.0] and len(receiver.attempts) == 4
    failed = [e for e in events.events if e.name == "reload.failed"]
    assert [e.details["hook"] for e in failed] == [shown, f"{shown} #2"]
    assert all(e.severity == "error" and e.key_id == auto for e in failed)
    key = engine.keyservice.get_key("acme", auto)
    assert file_sink.read_secret(key).reveal() == emulator.current_secret("acme", auto)
    assert state.attempts() == []
    page = key_page(engine, auto)  # the status page's key view: each hook's outcome in the history
    assert f"{shown}: failed: {shown}: 503" in page


def key_page(engine: Engine, key_id: str) -> str:
    from rotator.web.app import create_app
    from rotator.web.source import FleetSource
    from tests.test_web import running

    with running(create_app(FleetSource(engine, cache_s=0))) as client:
        answer = client.get(f"/keys/acme/{key_id}")
        assert answer.status_code == 200, answer.text
        return answer.text


def deployment() -> dict[str, Any]:
    """An application's Deployment, as the cluster holds it (the worker's manifest stands in)."""
    [doc] = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/worker.yaml").read_text())
             if d and d["kind"] == "Deployment"]
    return dict(doc)


def rollout(tmp_path: Path, api_url: str, deployments: list[str], ca_file: Path | None = None
            ) -> reload.KubernetesRollout:
    """A rollout-restart hook of namespace `payments`, with a service account token of its own."""
    token = tmp_path / "token"
    token.write_text("service-account-token\n")
    return reload.KubernetesRollout("payments", deployments, api_url, token, ca_file, 5)


def strategic_merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Maps merge key by key (all a rollout restart's patch holds)."""
    merged = copy.deepcopy(target)
    for name, value in patch.items():
        merged[name] = strategic_merge(merged.get(name) or {}, value) if isinstance(value, dict) else value
    return merged


def test_a_rollout_restart_reaches_the_kubernetes_api_with_a_patch_that_validates_offline(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
    tmp_path: Path,
) -> None:
    hook = rollout(tmp_path, receiver.url, ["payouts-api"])
    engine, _, _ = engine_with([hook], keyservice, state, file_sink)
    result = engine.rotate(KeyRef("acme", auto), trigger="schedule")
    assert result.reload == {"rollout payments/payouts-api": "ok"}, result.reload
    [call] = receiver.wait_for(1)
    assert [(r.path, "GET" if not r.body else "PATCH") for r in receiver.attempts] == [
        ("/apis/apps/v1/namespaces/payments/deployments/payouts-api", "GET"),
        ("/apis/apps/v1/namespaces/payments/deployments/payouts-api", "PATCH")]  # read first: a paused one is refused
    assert call.path == "/apis/apps/v1/namespaces/payments/deployments/payouts-api"
    assert call.headers["Authorization"] == "Bearer service-account-token"
    assert call.headers["Content-Type"] == "application/strategic-merge-patch+json"
    patched = strategic_merge(deployment(), call.json())
    annotations = patched["spec"]["template"]["metadata"]["annotations"]
    assert set(call.json()) == {"spec"} and annotations[reload.RESTARTED_AT].endswith("Z")
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(patched, version, strict=True)

    # The RBAC the manifests ship allows exactly this call, for the worker's service account.
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/reload/rbac.yaml").read_text()) if d]
    [role] = [d for d in docs if d["kind"] == "Role"]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    [rule] = role["rules"]
    assert (rule["apiGroups"], rule["resources"], rule["resourceNames"], sorted(rule["verbs"])) == \
        (["apps"], ["deployments"], ["payouts-api"], ["get", "patch"])
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "payments"
    [account] = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/serviceaccount.yaml").read_text()) if d]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "rotator"}]

    receiver.get_body = b'{"kind": "Deployment", "spec": {"paused": true}}'
    paused = engine.rotate(KeyRef("acme", auto), trigger="manual", force=True)
    assert "paused" in paused.reload["rollout payments/payouts-api"] and len(receiver.received) == 1
    receiver.answers = [403]
    again = engine.rotate(KeyRef("acme", auto), trigger="manual", force=True)
    assert again.status == "succeeded" and "deploy/kubernetes/reload/rbac.yaml" in again.reload["rollout payments/payouts-api"]


def test_reload_hooks_are_configured_completely(env: pytest.MonkeyPatch) -> None:
    base = {"sinks": [{"kind": "memory"}]}
    for hook, said in (({"kind": "http", "url": "https://app/reload"}, "secret_env or secret_file"),
                       ({"kind": "http", "url": "ftp://app", "secret_env": "S"}, "http(s)://"),
                       ({"kind": "kubernetes", "namespace": "payments"}, "namespace and deployments"),
                       ({"kind": "kubernetes", "namespace": "Payments", "deployments": ["a"]}, "namespace"),
                       ({"kind": "http", "url": "https://app/reload", "secret_env": "RELOAD_SECRET_UNSET"},
                        "reload[0].secret_env"),
                       ({"kind": "http", "url": "https://u:pw@app/reload", "secret_file": "/nonexistent"},
                        "reload[0].url"),
                       ({"kind": "kubernetes", "namespace": "payments", "deployments": ["a"],
                         "api_url": "http://10.0.0.1:6443"}, "https://")):
        with pytest.raises(ConfigError) as refused:
            settings_from_mapping({**base, "reload": [hook]})
        assert said in str(refused.value), (hook, str(refused.value))
    settings = settings_from_mapping({**base, "reload": [
        {"kind": "kubernetes", "namespace": "payments", "deployments": ["payouts-api"], "aliases": ["payouts"]}]})
    [rollout] = reload.build(settings.reload, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert isinstance(rollout, reload.KubernetesRollout) and rollout.api_url == "https://10.0.0.1:443"


def test_the_documented_api_token_mount_merged_into_the_worker_validates_offline() -> None:
    """docs/kubernetes.md's volume and mount for the hook's token, merged into worker.yaml as a
    strategic merge would (lists by name), is a valid Deployment, and the paths it mounts are the
    ones its `[[reload]]` example reads."""
    text = (ROOT / "docs/kubernetes.md").read_text().split("<!-- reload-token -->", 1)[1]
    snippet = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    worker = deployment()
    pod, extra = worker["spec"]["template"]["spec"], snippet["spec"]["template"]["spec"]
    pod["volumes"] = [*pod["volumes"], *extra["volumes"]]
    [container] = [c for c in pod["containers"] if c["name"] == extra["containers"][0]["name"]]
    container["volumeMounts"] = [*container["volumeMounts"], *extra["containers"][0]["volumeMounts"]]
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(worker, version, strict=True)
    mount = extra["containers"][0]["volumeMounts"][0]["mountPath"]
    import tomllib

    [hook] = tomllib.loads(example)["reload"]
    assert hook["token_file"] == f"{mount}/token" and hook["ca_file"] == f"{mount}/ca.crt"


def test_the_longest_rotation_counts_its_hooks(env: pytest.MonkeyPatch) -> None:
    """The bound the worker's grace period and the task's time limit are checked against grows with
    each hook's tries and time-outs (a hook runs after each store: a recovery and a fresh rotation)."""
    from rotator.config import longest_rotation_s

    base = {"sinks": [{"kind": "memory"}]}
    plain = longest_rotation_s(settings_from_mapping(base))
    hooked = longest_rotation_s(settings_from_mapping({**base, "reload": [
        {"kind": "kubernetes", "namespace": "payments", "deployments": ["a", "b"], "timeout_s": 10, "tries": 3}]}))
    assert hooked - plain == 2 * (3 * 2 * 10 + 1 + 2)


def test_a_worker_that_dies_in_a_hook_leaves_it_to_the_recovery_sweep(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, auto: str, receiver: Receiver,
) -> None:
    """The rotation is in the history before any hook runs; a worker killed inside a hook leaves it
    pending, and the next recovery sweep tells the application, with the very same signed body (its
    `webhook-id` lets the application drop a repeat); a later rotation of the key supersedes it."""
    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5)
    engine, _, _ = engine_with([hook], keyservice, state, file_sink)

    def dies(told: dict[str, Any]) -> dict[str, str]:
        reload.run_all([hook], told)  # the call went out; the worker died before it noted the answer
        raise Crash()

    engine.ctx.reload = dies
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", auto), trigger="schedule")
    assert [e["kind"] for e in state.history()] == ["rotation"] and len(state.pending_reloads()) == 1
    survivor, _, _ = engine_with([hook], keyservice, state, file_sink)
    survivor.recover_all()
    first, again = receiver.wait_for(2)
    assert first.body == again.body and first.headers["webhook-id"] == again.headers["webhook-id"]
    assert state.pending_reloads() == [] and state.history()[0]["kind"] == "reload"
    survivor.recover_all()
    assert len(receiver.received) == 2  # told once more, not on every sweep


def test_a_hooks_own_fault_and_two_hooks_that_show_alike(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, auto: str, receiver: Receiver,
    tmp_path: Path,
) -> None:
    """A CA bundle that is not there is a failed hook, not a rotation that raises; two endpoints
    that differ only in their query keep their own outcomes, and the failed one is told."""
    missing_ca = rollout(tmp_path, "https://127.0.0.1:1", ["payouts-api"], tmp_path / "not-mounted" / "ca.crt")
    receiver.answers = [404]
    first = reload.HttpReload(f"{receiver.url}/reload?app=payouts", HOOK_SECRET, 5)
    second = reload.HttpReload(f"{receiver.url}/reload?app=ledger", HOOK_SECRET, 5)
    engine, events, _ = engine_with([missing_ca, first, second], keyservice, state, file_sink)
    result = engine.rotate(KeyRef("acme", auto), trigger="schedule")
    assert result.status == "succeeded", result.reason
    assert "cannot read the API server's CA bundle" in result.reload["rollout payments/payouts-api"]
    assert result.reload[f"reload {receiver.url}/…"].endswith("404")
    assert result.reload[f"reload {receiver.url}/… #2"] == "ok"
    assert len([e for e in events.events if e.name == "reload.failed"]) == 2


def test_a_spent_budget_of_one_pending_reload_holds_back_only_its_hooks(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
) -> None:
    """acme: a worker died in a hook (a pending reload). beta: a worker died between reset and
    store (an attempt whose secret is in no sink). acme's rate budget is spent (a 429's pause):
    the sweep still settles beta's attempt and returns it; acme's hooks wait."""
    beta = next(iter(emulator.add_client("beta", "Beta", created_at=emulator.now() - 100 * DAY).keys))
    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5)

    dying, _, _ = engine_with([hook], keyservice, state, file_sink)

    def dies(told: dict[str, Any]) -> dict[str, str]:
        raise Crash()

    dying.ctx.reload = dies
    with pytest.raises(Crash):
        dying.rotate(KeyRef("acme", auto), trigger="schedule")
    assert len(state.pending_reloads()) == 1

    storing, _, _ = engine_with([hook], keyservice, state, Dies(file_sink))
    with pytest.raises(Crash):
        storing.rotate(KeyRef("beta", beta), trigger="schedule")
    assert [str(a.ref) for a in state.attempts()] == [f"beta/{beta}"]

    RateBudget(state.client, state.ns).observe("acme", pause_s=600, pause_why="429")
    keyservice.budget = RateBudget(state.client, state.ns, longest_wait_s=0.2)
    survivor, _, _ = engine_with([hook], keyservice, state, file_sink)
    results = survivor.recover_all()
    assert [r.key_id for r in results] == [beta] and len(state.pending_reloads()) == 1


def test_a_deployment_that_is_gone_holds_back_none_of_the_others(
    receiver: Receiver, tmp_path: Path,
) -> None:
    hook = rollout(tmp_path, receiver.url, ["old-api", "payouts-api"])
    receiver.answers = [404]  # GET old-api: deleted since the hook was configured
    outcome = reload.run_all([hook], {"client_id": "acme", "key_id": "k"}, sleep=lambda s: None)
    assert "not found" in outcome["rollout payments/old-api,payouts-api"]
    patched = [r.path.rsplit("/", 1)[-1] for r in receiver.attempts if r.body]
    assert "payouts-api" in patched, "payouts-api, which exists and is not paused, was never restarted"


def test_a_try_again_restarts_only_the_deployments_not_yet_restarted(
    receiver: Receiver, tmp_path: Path,
) -> None:
    hook = rollout(tmp_path, receiver.url, ["ledger-api", "payouts-api"])
    receiver.answers = [200, 200, 503]  # GET ledger, PATCH ledger, GET payouts: 503 once
    outcome = reload.run_all([hook], {"client_id": "acme", "key_id": "k"}, sleep=lambda s: None)
    calls = [(r.path.rsplit("/", 1)[-1], "PATCH" if r.body else "GET") for r in receiver.attempts]
    assert outcome == {"rollout payments/ledger-api,payouts-api": "ok"}
    assert calls.count(("ledger-api", "PATCH")) == 1, "ledger-api's pods were restarted twice for one secret"


def test_a_spent_budget_of_one_pending_reload_leaves_the_other_clients_repaired(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
) -> None:
    """beat's repair (`repair(fresh=False)`) waits only for a Client ID whose budget is spent and
    repairs the others; a pending reload of that Client ID's key makes it repair nobody."""
    beta = next(iter(emulator.add_client("beta", "Beta", created_at=emulator.now() - 100 * DAY).keys))
    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5)
    engine, _, _ = engine_with([hook], keyservice, state, file_sink)
    assert engine.rotate(KeyRef("beta", beta), trigger="schedule").status == "succeeded"
    key = keyservice.get_key("acme", auto)
    state.put_pending_reload({"client_id": "acme", "key_id": auto, "alias": key.alias, "base_alias": key.base_alias,
                              "environment": "PRODUCTION", "key_reset_at": key.born_at, "attempt_id": "a",
                              "replaces": None, "trigger": "schedule", "stored_at": "2026-12-07T00:00:00Z"})
    [lost] = list((Path(file_sink.config.dir) / "beta").iterdir())
    lost.unlink()  # beta's sink lost its secret: the repair replays the reset and writes it back

    RateBudget(state.client, state.ns).observe("acme", pause_s=600, pause_why="429")
    keyservice.budget = RateBudget(state.client, state.ns, longest_wait_s=0.2)
    from rotator.engine.reconcile import Stopped

    with pytest.raises(Stopped):  # as designed: acme waits for its budget, the others are repaired
        engine.repair(fresh=False)
    assert lost.exists()


def test_a_sweep_tells_nobody_twice_while_a_worker_is_still_in_its_hook(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, file_sink: Any, receiver: Receiver, auto: str,
) -> None:
    """A slow hook is not a dead worker: a recovery sweep running meanwhile finds the key's lease held
    (its worker is still telling) and tells nobody a second time."""
    import threading
    import time

    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5)
    engine, _, _ = engine_with([hook], keyservice, state, file_sink)
    receiver.hang_s = 1.0
    worker = threading.Thread(target=engine.rotate, args=(KeyRef("acme", auto),), kwargs={"trigger": "schedule"})
    worker.start()
    deadline = time.monotonic() + 10
    while not state.pending_reloads() and time.monotonic() < deadline:
        time.sleep(0.01)
    survivor, _, _ = engine_with([hook], keyservice, state, file_sink)
    survivor.recover_all()  # the beat's sweep, on another worker
    worker.join()
    assert len(receiver.received) == 1


@pytest.mark.parametrize("successors", [True, False])
def test_an_overlap_rotation_tells_its_reload_hooks(
    keyservice: HttpKeyService, emulator: Emulator, state: RedisState, file_sink: Any, receiver: Receiver,
    successors: bool,
) -> None:
    """docs/strategies.md: hooks run once every sink holds the new secret, 'any strategy, every
    trigger; not for an overlap key whose new key failed its checks'. A clean overlap rotation
    (successor created, stored, verified: `succeeded`) tells them, in either mode."""
    from rotator.aliases import AliasTemplate

    emulator.successors = successors
    if not successors:
        keyservice.alias_template = AliasTemplate()  # what build_keyservice sets for successors = false
    now = emulator.now()
    emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)
    payouts = emulator.add_key("acme", "payouts", [{"Scope": "Payins", "Read": True, "Write": True}],
                               created_at=now - 100 * DAY).id
    hook = reload.HttpReload(f"{receiver.url}/admin/reload", HOOK_SECRET, 5)
    engine, _, _ = engine_with([hook], keyservice, state, file_sink)
    result = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert result.status == "succeeded", result.reason
    assert result.reload == {f"reload {receiver.url}/…": "ok"}
