"""The overlap strategy's alias-template mode, against the contract as the payment API publishes it
(the emulator over HTTP with unique aliases and no `Replaces`), a real Redis, a real OpenBao and the
encrypted file sink: a due revocable key gets a new key `payouts--r1` with its scopes, stored at the
base alias's place and verified before the old key is revoked after its grace; the lineage is
proved from the create's answer and the sinks, never from a listing, and survives a wiped Redis, a
person's look-alike key, a person's revoke and a worker killed between create and store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from rotator.aliases import AliasTemplate
from rotator.config import settings_from_mapping
from rotator.domain import KeyRef, slug
from rotator.engine import Engine
from rotator.errors import NotFoundError
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.runtime import build_keyservice
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import FP_KEY, TOKEN
from tests.crashes import Crash, Dies
from tests.test_engine import FP
from tests.test_overlap import Clock

DAY = 86_400
GRACE = 7 * DAY
SCOPES = [{"Scope": "Payins", "Read": True, "Write": True}, {"Scope": "Users", "Read": True, "Write": False}]


@pytest.fixture
def published() -> Iterator[tuple[Emulator, EmulatorServer]]:
    emulator = Emulator(token=TOKEN, successors=False)
    with EmulatorServer(emulator) as server:
        yield emulator, server


@pytest.fixture
def service(published: tuple[Emulator, EmulatorServer], env: pytest.MonkeyPatch) -> Iterator[HttpKeyService]:
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    env.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    settings = settings_from_mapping({"keyservice": {"url": published[1].url, "successors": False},
                                      "policy": {"strategy": "overlap"},
                                      "sinks": [{"kind": "memory", "path": "{client_id}/{base_alias}"}]})
    built = build_keyservice(settings.keyservice)
    assert isinstance(built, HttpKeyService) and isinstance(getattr(built, "alias_template", None), AliasTemplate)
    yield built
    built.close()


@pytest.fixture
def sinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bao_sink: dict[str, object]) -> list[Any]:
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    return [registry.build("file", {"dir": str(tmp_path / "secrets"), "path": "{client_id}/{base_alias}.secret"}, FP),
            registry.build("vault", {**bao_sink, "path": "rotator/{client_id}/{base_alias}"}, FP)]


@pytest.fixture
def payouts(published: tuple[Emulator, EmulatorServer]) -> str:
    emulator = published[0]
    now = emulator.now()
    emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)
    return emulator.add_key("acme", "payouts", SCOPES, created_at=now - 100 * DAY).id


def engine_of(service: HttpKeyService, state: RedisState, sinks: list[Any], clock: Clock | None = None,
              ) -> tuple[Engine, CapturePublisher]:
    events = CapturePublisher()
    return Engine(service, sinks, state, events, FP, Policy(strategy="overlap", overlap_grace_s=GRACE),
                  clock=clock or Clock()), events


def aliases(emulator: Emulator) -> dict[str, str]:
    """alias -> key id of every live key of acme."""
    rows, _ = emulator.keys_page("acme", 1, 100)
    return {row["Alias"]: row["Id"] for row in rows}


def document(sink: Any, key: Any) -> dict[str, Any]:
    """The stored document at the key's place, read as a consumer reads it (by base alias)."""
    if sink.kind == "vault":
        client = sink._client_or_login()
        path = f"rotator/acme/{slug(key)}"
        return dict(client.secrets.kv.v2.read_secret_version(path=path, mount_point=sink.config.mount,
                                                             raise_on_deleted_version=True)["data"]["data"])
    return json.loads(Fernet(__import__("os").environ["ROTATOR_FILE_KEY"]).decrypt(
        (Path(sink.config.dir) / "acme" / f"{slug(key)}.secret").read_bytes()))


def serving(emulator: Emulator, sinks: list[Any], base: str) -> str:
    """The key id every sink's document at `base` names, checked to hold that key's live secret."""
    docs = [document(sink, base) for sink in sinks]
    assert len({d["key_id"] for d in docs}) == 1, docs
    assert all(d["base_alias"] == base and d["api_key"] == emulator.current_secret("acme", d["key_id"])
               for d in docs)
    return str(docs[0]["key_id"])


def test_a_due_key_gets_a_new_key_under_a_derived_alias_and_is_revoked_after_its_grace(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    emulator, _ = published
    old_secret = emulator.current_secret("acme", payouts)
    clock = Clock()
    engine, events = engine_of(service, state, sinks, clock)

    first = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert first.status == "succeeded", first.reason
    new = aliases(emulator)["payouts--r1"]
    assert serving(emulator, sinks, "payouts") == new
    assert document(sinks[0], "payouts")["alias"] == "payouts--r1" and document(sinks[0], "payouts")["replaces"] == payouts
    assert emulator.get_key("acme", new)["Scopes"] == emulator.get_key("acme", payouts)["Scopes"]
    assert emulator.check_secret("acme", old_secret) and emulator.ledger == []  # a create, not a reset
    assert events.names() == ["rotation.succeeded", "key.retiring"]
    listed = {k.key_id: k for k in engine.keyservice.list_keys("acme")}
    assert listed[payouts].replaced_by == new and listed[new].replaces == payouts
    assert listed[new].base_alias == "payouts"
    from tests.test_reload_hooks import key_page

    assert f"base alias payouts; replaces {payouts}" in key_page(engine, new)  # the status page shows the lineage
    assert f"replaced by {new}; revoked after" in key_page(engine, payouts)

    clock.shift = GRACE - 60
    waiting = engine.rotate(KeyRef("acme", payouts), trigger="manual", force=True)
    assert waiting.status == "skipped" and "retiring" in waiting.reason and emulator.check_secret("acme", old_secret)
    clock.shift = GRACE + 60
    revoked = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert revoked.status == "succeeded" and "revoked" in revoked.reason, revoked.reason
    assert "payouts" not in aliases(emulator) and not emulator.check_secret("acme", old_secret)

    # Ninety days on, the lineage moves on to --r2 (never payouts--r1--r1), at the same place.
    clock.shift += 95 * DAY
    second = engine.rotate(KeyRef("acme", new), trigger="schedule")
    assert second.status == "succeeded", second.reason
    newer = aliases(emulator)["payouts--r2"]
    assert serving(emulator, sinks, "payouts") == newer
    clock.shift += GRACE + 60
    assert was_revoked(engine.rotate(KeyRef("acme", new), trigger="schedule"))
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts--r2"]


def test_a_persons_look_alike_keys_are_passed_by_and_never_revoked(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """A person's `payouts--r1` (made before the first rotation) is no part of the lineage: the new
    key is `payouts--r2`; the person's key is never revoked, and rotated as its own base."""
    emulator, _ = published
    now = emulator.now()
    mine = emulator.add_key("acme", "payouts--r1", SCOPES, created_at=now - 100 * DAY).id
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r2"]
    assert serving(emulator, sinks, "payouts") == new
    assert engine.keyservice.get_key("acme", mine).replaces is None

    rotated = engine.rotate(KeyRef("acme", mine), trigger="schedule")  # due too: its own lineage
    assert rotated.status == "succeeded", rotated.reason
    own = aliases(emulator)["payouts--r1--r1"]
    assert serving(emulator, sinks, "payouts--r1") == own and serving(emulator, sinks, "payouts") == new

    clock.shift = GRACE + 60
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    assert was_revoked(engine.rotate(KeyRef("acme", mine), trigger="schedule"))
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts--r1--r1", "payouts--r2"]


def was_revoked(result: Any) -> bool:
    assert result.status == "succeeded" and result.reason.startswith("revoked"), result.reason
    return True


def wipe(state: RedisState) -> None:
    for entry in state.client.scan_iter(f"{state.ns}:*"):
        state.client.delete(entry)


def test_a_wiped_redis_mid_lineage_rebuilds_it_from_the_sinks_and_creates_nothing_twice(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    emulator, _ = published
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r1"]
    wipe(state)

    again = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert again.status == "skipped" and "retiring" in again.reason, again.reason
    assert len(aliases(emulator)) == 3  # no second create
    assert state.lineage_links("acme")[new] == {"base": "payouts", "replaces": payouts}

    wipe(state)
    clock.shift = GRACE + 60
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    wipe(state)  # the new key alone: proved to be of lineage payouts by the sinks, not by its name
    clock.shift += 95 * DAY
    assert engine.rotate(KeyRef("acme", new), trigger="schedule").status == "succeeded"
    assert serving(emulator, sinks, "payouts") == aliases(emulator)["payouts--r2"]


@pytest.mark.parametrize("lost", ["nothing", "redis"])
def test_a_worker_killed_between_create_and_store_is_finished_from_the_creates_answer(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str, lost: str,
) -> None:
    """The create ran; the worker died before any sink held the new key. With the record (recovery)
    or without it (a wiped Redis: the next rotation sends the same Idempotency-Key, gets the 409 and
    replays), the same new key is stored: one create."""
    emulator, _ = published
    engine, _ = engine_of(service, state, [Dies(sink) for sink in sinks])
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    new = aliases(emulator)["payouts--r1"]
    if lost == "redis":
        wipe(state)
    survivor, events = engine_of(service, state, sinks)
    if lost == "redis":
        result = survivor.rotate(KeyRef("acme", payouts), trigger="schedule")
    else:
        [result] = survivor.recover_all()
    assert result.status in ("succeeded", "recovered"), result.reason
    assert serving(emulator, sinks, "payouts") == new
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts", "payouts--r1"]  # one create
    assert "key.retiring" in events.names() and state.attempts() == []


def test_a_person_revoking_the_old_key_before_the_store_still_gets_the_new_key_stored(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    emulator, _ = published
    engine, _ = engine_of(service, state, [Dies(sink) for sink in sinks])
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    new = aliases(emulator)["payouts--r1"]
    emulator.revoke_key("acme", payouts)
    survivor, _ = engine_of(service, state, sinks)
    [result] = survivor.recover_all()
    assert result.status in ("succeeded", "recovered"), result.reason
    assert serving(emulator, sinks, "payouts") == new
    with pytest.raises(NotFoundError):
        service.get_key("acme", payouts)
    assert survivor.keyservice.get_key("acme", new).replaces is None  # the link to a revoked key is gone


def test_an_alias_taken_at_the_last_moment_is_refused_and_the_next_one_used(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A person creates `payouts--r1` between the listing and the create: the create gets `409`, which
    the key service stores under its Idempotency-Key (refused: nothing ran); the next rotation uses
    the next epoch's key and `payouts--r2`. The person's key is never touched."""
    emulator, _ = published
    create = service.create_key
    taken: list[str] = []

    def taken_then_create(client_id: str, alias: str, *args: Any, **kwargs: Any) -> Any:
        if not taken:
            taken.append(emulator.add_key("acme", alias, SCOPES).id)
        return create(client_id, alias, *args, **kwargs)

    monkeypatch.setattr(service, "create_key", taken_then_create)
    engine, _ = engine_of(service, state, sinks)
    first = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert first.status == "failed" and "refused" in first.reason, first.reason
    assert state.attempts() == [] and sorted(aliases(emulator)) == ["Auto-generated key", "payouts", "payouts--r1"]
    second = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert second.status == "succeeded", second.reason
    assert serving(emulator, sinks, "payouts") == aliases(emulator)["payouts--r2"]
    assert aliases(emulator)["payouts--r1"] == taken[0]
    assert engine.keyservice.get_key("acme", taken[0]).replaces is None


def test_a_lost_create_answer_never_revokes_a_key_it_cannot_prove_it_made(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """The create ran, its answer was cut, and its stored response expired (24 h): nothing proves
    that `payouts--r1` is the key it made (a listing is no proof), so it is never revoked; the
    create is sent again (its Idempotency-Key expired too) and makes `payouts--r2`, which is stored."""
    emulator, _ = published
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="after", times=1))
    engine = Engine(service, sinks, state, CapturePublisher(), FP, Policy(strategy="overlap", overlap_grace_s=GRACE),
                    horizon_s=0.0)
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    first = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert first.status == "in_doubt", first.reason
    unheld = aliases(emulator)["payouts--r1"]
    emulator.clear_faults()
    emulator._stored.clear()  # 24 hours on: the stored answer, and the key's block, are gone
    second = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert second.status == "recovered", second.reason  # the attempt, settled by sending it again
    assert serving(emulator, sinks, "payouts") == aliases(emulator)["payouts--r2"]
    assert aliases(emulator)["payouts--r1"] == unheld  # never revoked: not proved to be rotator's
    assert engine.keyservice.get_key("acme", unheld).replaces is None


def test_a_person_revoking_either_key_during_the_grace(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """The old key revoked by a person: the new one stands alone in the lineage and moves on to
    `--r2` when due. The new key revoked by a person: its document still holds the place, so the old
    key's next rotation creates nothing and overwrites nothing, and nothing is revoked."""
    emulator, _ = published
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r1"]
    emulator.revoke_key("acme", payouts)
    alone = engine.keyservice.get_key("acme", new)
    assert alone.replaces is None and alone.base_alias == "payouts"
    clock.shift = 95 * DAY
    assert engine.rotate(KeyRef("acme", new), trigger="schedule").status == "succeeded"
    newer = aliases(emulator)["payouts--r2"]
    assert serving(emulator, sinks, "payouts") == newer

    emulator.revoke_key("acme", newer)  # a person revokes the key that serves the place
    clock.shift += GRACE + 60
    result = engine.rotate(KeyRef("acme", new), trigger="schedule")
    assert result.status == "failed" and "another key" in result.reason, result.reason
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts--r1"]  # nothing created, nothing revoked


def test_a_partial_store_and_a_wiped_redis_are_finished_by_the_repair_from_the_sink_that_holds_it(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """OpenBao got the new key, the worker died before the file sink did, and Redis was lost: the
    OpenBao document proves the lineage (the old key is retiring, no second create), the repair
    copies the new key's secret to the file sink once it authenticates, and the old key is revoked
    only a whole grace after that."""
    emulator, _ = published
    engine, _ = engine_of(service, state, [Dies(sinks[0]), sinks[1]])
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    new = aliases(emulator)["payouts--r1"]
    deadline = time.monotonic() + 5
    while sinks[1].read_state(engine.keyservice.get_key("acme", new)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    wipe(state)
    clock = Clock()
    survivor, _ = engine_of(service, state, sinks, clock)
    waiting = survivor.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert waiting.status == "skipped" and "retiring" in waiting.reason, waiting.reason
    clock.shift = GRACE + 60
    refused = survivor.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert refused.status == "failed" and "does not hold successor" in refused.reason, refused.reason
    survivor.repair(fresh=False)
    assert serving(emulator, sinks, "payouts") == new
    clock.shift += GRACE + 60  # the file sink's consumers get the whole grace too
    assert was_revoked(survivor.rotate(KeyRef("acme", payouts), trigger="schedule"))
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts--r1"]


def test_the_cli_plans_rotates_and_shows_a_lineage_without_successors(
    tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, published: tuple[Emulator, EmulatorServer],
    payouts: str,
) -> None:
    """An operator's view of the alias-template mode, through the real CLI: the plan names the mode
    and the base alias, `--apply` creates `payouts--r1`, and `status` shows the lineage (base alias,
    the serving key, the retiring key and its revoke time)."""
    import uuid

    from typer.testing import CliRunner

    from rotator.cli import app
    from tests.conftest import write_config

    emulator, server = published
    env.setenv("ROTATOR_STATE__NAMESPACE", f"alias-{uuid.uuid4().hex[:8]}")
    path = write_config(tmp_path / "rotator.toml", server.url, redis_server, clients=["acme"],
                        sinks='kind = "memory"\npath = "{client_id}/{base_alias}"')
    path.write_text(path.read_text().replace("[state]", "successors = false\n[policy]\nstrategy = \"overlap\"\n[state]"))
    runner = CliRunner()
    one = ["--client-id", "acme", "--key-id", payouts, "--config", str(path)]
    plan = runner.invoke(app, ["rotate", *one])
    assert plan.exit_code == 0 and "alias template" in plan.stdout and "'payouts'" in plan.stdout, plan.output
    applied = runner.invoke(app, ["rotate", *one, "--apply", "--json"])
    assert applied.exit_code == 0, applied.output
    new = aliases(emulator)["payouts--r1"]
    status = runner.invoke(app, ["status", "--json", "--config", str(path)])
    rows = {r["key_id"]: r for r in json.loads(status.stdout)["keys"]}
    assert rows[payouts]["state"] == "retiring" and rows[payouts]["retiring"]["successor"] == new
    assert rows[payouts]["retiring"]["revoke_at"]
    assert (rows[new]["alias"], rows[new]["base_alias"], rows[new]["replaces"]) == ("payouts--r1", "payouts", payouts)
    text = runner.invoke(app, ["status", "--config", str(path)]).stdout
    assert "payouts--r1 (lineage payouts)" in text and f"retiring -> {new}, revoked after" in text, text


def test_an_alias_the_key_service_would_refuse_is_never_sent(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
) -> None:
    """A base alias so long that its next alias breaks the contract's 200 characters: the rotation
    fails saying so before any attempt is recorded (nothing sent, nothing in doubt), every time;
    a template that would add control characters is refused by the configuration."""
    emulator, _ = published
    now = emulator.now()
    emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)
    long = emulator.add_key("acme", "p" * 197, SCOPES, created_at=now - 100 * DAY).id
    engine, events = engine_of(service, state, sinks)
    for _ in range(2):
        result = engine.rotate(KeyRef("acme", long), trigger="schedule")
        assert result.status == "failed" and "is longer than 200 characters" in result.reason, result.reason
        assert "nothing was created" in result.reason
    assert state.attempts() == [] and len(aliases(emulator)) == 2 and "rotation.in_doubt" not in events.names()
    for template in ("{alias}\t{n}", "{alias}" + "-" * 17 + "{n}", "{alias}\u202e{n}"):
        with pytest.raises(ValueError, match="at most 16 characters"):
            AliasTemplate(template)


def test_a_document_naming_a_key_outside_the_lineage_links_nothing(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """One sink's document at the place of `payouts` edited to say it `replaces` a person's key
    `billing` (in no lineage), then Redis lost: only an older key of the lineage's own aliases can
    be the key a document's key replaced, and sinks that disagree prove nothing, so `billing` is
    never linked nor revoked, the lineage waits (loudly) until the document is put right, and the
    real old key is retired after that."""
    emulator, _ = published
    billing = emulator.add_key("acme", "billing", SCOPES, created_at=emulator.now() - 10 * DAY).id
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    vault = sinks[1]
    client = vault._client_or_login()
    doc = document(vault, "payouts")
    client.secrets.kv.v2.create_or_update_secret(path="rotator/acme/payouts", secret={**doc, "replaces": billing},
                                                 mount_point=vault.config.mount)
    wipe(state)
    listed = {k.key_id: k for k in engine.keyservice.list_keys("acme")}
    assert listed[billing].replaced_by is None and listed[billing].base_alias == "billing"
    clock.shift = GRACE + 60
    engine.rotate(KeyRef("acme", billing), trigger="schedule")
    waiting = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert waiting.status == "failed" and "disagree" in waiting.reason, waiting.reason
    assert "billing" in aliases(emulator) and "payouts" in aliases(emulator)
    client.secrets.kv.v2.create_or_update_secret(path="rotator/acme/payouts", secret=doc, mount_point=vault.config.mount)
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    assert "billing" in aliases(emulator)


def test_a_reset_of_the_new_key_during_the_grace_keeps_the_proof_of_its_lineage(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """`rotate --force` on `payouts--r1` during the grace resets it in place; its new document still
    names the key it replaces, so after a lost Redis the old key is still retired."""
    emulator, _ = published
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r1"]
    forced = engine.rotate(KeyRef("acme", new), trigger="manual", force=True)
    assert forced.status == "succeeded" and [e.key_id for e in emulator.ledger] == [new], forced.reason
    assert document(sinks[0], "payouts")["replaces"] == payouts
    wipe(state)
    clock.shift = GRACE + 60
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    assert serving(emulator, sinks, "payouts") == new


class RefusesWrites:
    """The state store as a read-only Redis user has it: every write refused."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

    def put_lineage_links(self, *args: Any, **kwargs: Any) -> None:
        import redis

        raise redis.exceptions.NoPermissionError("no permissions to run the 'evalsha' command")

    drop_lineage_links = put_lineage_links


def test_a_store_that_refuses_writes_still_reads_a_lineage(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """The lineage links are a cache: a reader whose store refuses writes (the status page's user)
    reads a key whose partner a person revoked, and proves an unknown one, without failing."""
    from rotator.engine.successors import AliasSuccessors

    emulator, _ = published
    engine, _ = engine_of(service, state, sinks)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    emulator.revoke_key("acme", aliases(emulator)["payouts--r1"])
    reader = AliasSuccessors(service, AliasTemplate(), RefusesWrites(state), sinks)  # type: ignore[arg-type]
    assert reader.get_key("acme", payouts).replaced_by is None
    wipe(state)
    assert reader.get_key("acme", payouts).base_alias == "payouts"


def test_a_revoke_that_fails_keeps_the_old_key_retiring(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """The key service answers the revoke with 503 (nothing revoked): the lineage is kept, so the
    old key is still retiring, nothing is created again, and the next run revokes it."""
    emulator, _ = published
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    clock.shift = GRACE + 60
    emulator.add_fault(Fault(method="DELETE", path=r"/apikeys/", status=503, times=-1))
    failed = engine.rotate(KeyRef("acme", payouts), trigger="schedule")
    assert failed.status == "failed" and "revoking failed" in failed.reason, failed.reason
    emulator.clear_faults()
    listed = {k.key_id: k for k in engine.keyservice.list_keys("acme")}  # as a scan or a repair sees it
    assert listed[payouts].replaced_by == aliases(emulator)["payouts--r1"]
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    assert sorted(aliases(emulator)) == ["Auto-generated key", "payouts--r1"]


def test_a_forged_replaces_naming_a_look_alike_revokes_nothing(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str,
) -> None:
    """A person's `payouts--r1` (passed by: the lineage went to `--r2`), the real predecessor
    retired, then one sink's document edited to say `payouts--r2` replaces the person's key and
    Redis lost: the other sink's document says otherwise, so nothing is proved and the person's
    key is neither linked nor revoked."""
    emulator, _ = published
    mine = emulator.add_key("acme", "payouts--r1", SCOPES, created_at=emulator.now() - 100 * DAY).id
    clock = Clock()
    engine, _ = engine_of(service, state, sinks, clock)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r2"]
    clock.shift = GRACE + 60
    assert was_revoked(engine.rotate(KeyRef("acme", payouts), trigger="schedule"))
    vault = sinks[1]
    doc = document(vault, "payouts")
    vault._client_or_login().secrets.kv.v2.create_or_update_secret(
        path="rotator/acme/payouts", secret={**doc, "replaces": mine}, mount_point=vault.config.mount)
    wipe(state)
    engine.rotate(KeyRef("acme", mine), trigger="schedule")
    assert aliases(emulator)["payouts--r1"] == mine and aliases(emulator)["payouts--r2"] == new


def test_a_proof_the_store_did_not_keep_still_places_a_reset(
    published: tuple[Emulator, EmulatorServer], service: HttpKeyService, state: RedisState, sinks: list[Any],
    payouts: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis lost its links and refuses the write of the proof read from the sinks: the forced
    reset of `payouts--r1` is still stored at the place `payouts` that consumers read."""
    import redis

    emulator, _ = published
    engine, _ = engine_of(service, state, sinks)
    assert engine.rotate(KeyRef("acme", payouts), trigger="schedule").status == "succeeded"
    new = aliases(emulator)["payouts--r1"]
    wipe(state)
    put, refused = state.put_lineage_links, []

    def blip(*args: Any, **kwargs: Any) -> None:
        if not refused:
            refused.append(1)
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        put(*args, **kwargs)

    monkeypatch.setattr(state, "put_lineage_links", blip)
    fresh, _ = engine_of(service, state, sinks)  # another worker: nothing proved in its memory yet
    forced = fresh.rotate(KeyRef("acme", new), trigger="manual", force=True)
    assert forced.status == "succeeded" and refused, forced.reason
    assert serving(emulator, sinks, "payouts") == new  # the live secret, at the base alias's place
