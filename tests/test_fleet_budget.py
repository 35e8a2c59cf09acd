"""The engine under the fleet's rate budget, against the emulator over HTTP with its published rate
limits and a real Redis: what the budget holds back is deferred (never failed, nothing lost), a
429 stops every worker, and the calls the emulator counts never pass the share."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator.budget import RateBudget
from rotator.domain import KeyRef
from rotator.errors import BudgetSpent
from rotator.keyservice.emulator import DEFAULT_RATE_LIMITS, RATE_WINDOWS_S, Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.state import RedisState
from tests.conftest import TOKEN, write_config
from tests.test_engine import holds_current, lose_the_answer, make_engine, memory, plant

DAY = 86_400


class Counted:
    """Every call the emulator's rate limit sees for a Client ID, and how many it refused (429)."""

    def __init__(self, emulator: Emulator) -> None:
        self.calls = 0
        self.refused = 0
        real = emulator.rate_call

        def counting(client_id: str) -> tuple[dict[str, str], int | None]:
            headers, wait = real(client_id)
            self.calls += 1
            self.refused += wait is not None
            return headers, wait

        emulator.rate_call = counting  # type: ignore[method-assign]


def with_budget(service: HttpKeyService, state: RedisState, emulator: Emulator, **kwargs: Any) -> RateBudget:
    service.budget = RateBudget(state.client, state.ns, clock=emulator.now, longest_wait_s=0.2,
                                **{"share": 0.5, "reserve": 0.0, **kwargs})
    return service.budget


@pytest.fixture
def fleet(emulator: Emulator) -> list[str]:
    """Twelve due production keys of one Client ID."""
    now = emulator.now()
    client = emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)
    return [next(iter(client.keys))] + [
        emulator.add_key("acme", f"key-{n}", created_at=now - 100 * DAY).id for n in range(11)]


@pytest.fixture
def second(emulator_server: EmulatorServer) -> Iterator[HttpKeyService]:
    """Another worker's adapter: its own connection, the same fleet budget."""
    with HttpKeyService(emulator_server.url, TOKEN, timeout_s=2, max_attempts=4, retry_initial_s=0.01,
                        retry_max_wait_s=0.2, clock_skew_s=3 * 86_400) as service:
        yield service


def test_keys_past_the_share_are_deferred_and_rotated_after_the_window(
        emulator: Emulator, keyservice: HttpKeyService, second: HttpKeyService, state: RedisState,
        fleet: list[str]) -> None:
    """With 40 calls left in the 15-minute window and a share of 0.5, the fleet sends at most 20:
    the keys it gets to are rotated and stored, the rest deferred (no record, no failure, one
    `rotation.deferred` for the fleet), and rotated once the window starts again."""
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0] - 40)  # the platform's payments
    unmetered = second  # the test's own look at the key service, outside the fleet's budget
    counted = Counted(emulator)
    with_budget(keyservice, state, emulator)
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    results = [engine.rotate(KeyRef("acme", key_id), trigger="schedule") for key_id in fleet]
    statuses = [r.status for r in results]
    assert counted.calls <= 20 and counted.refused == 0, counted.calls  # before the test's own look
    assert set(statuses) == {"succeeded", "deferred"} and statuses.index("deferred") >= 5, statuses
    done = [r.key_id for r in results if r.status == "succeeded"]
    assert all(holds_current(sink, emulator, "acme", key_id, unmetered) for key_id in done)
    assert state.attempts() == [] and len(emulator.ledger) == len(done), [r.to_dict() for r in results]
    assert events.names().count("rotation.deferred") == 1
    deferred = [r for r in results if r.status == "deferred"]
    assert all(r.deferred_until and "deferred: the next scan or sweep takes it" in r.reason for r in deferred)
    assert "rotation.failed" not in events.names()

    emulator.clock_offset_s += RATE_WINDOWS_S[0] + 1  # the window starts again
    again = [engine.rotate(KeyRef("acme", r.key_id), trigger="schedule") for r in deferred]
    assert [r.status for r in again] == ["succeeded"] * len(deferred)
    assert sorted(e.key_id for e in emulator.ledger) == sorted(fleet)  # each key reset once
    assert all(holds_current(sink, emulator, "acme", key_id, unmetered) for key_id in fleet)


def test_a_429_stops_every_worker_before_it_sends(emulator: Emulator, keyservice: HttpKeyService,
                                                  second: HttpKeyService, state: RedisState,
                                                  fleet: list[str]) -> None:
    """One worker's 429 (with Retry-After) pauses the fleet: it does not retry into the limit, and
    another worker's next call is held back without reaching the key service."""
    with_budget(keyservice, state, emulator, reserve=0.1)
    with_budget(second, state, emulator, reserve=0.1)
    keyservice.get_key("acme", fleet[0])
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0])  # the platform spent the window meanwhile
    counted = Counted(emulator)
    with pytest.raises(BudgetSpent, match="spent until"):
        keyservice.get_key("acme", fleet[0])
    assert (counted.calls, counted.refused) == (1, 1)  # one try, not max_attempts of them
    with pytest.raises(BudgetSpent):
        second.get_key("acme", fleet[1])
    assert (counted.calls, counted.refused) == (1, 1)
    # A replay (settling an attempt already sent) is held back by the pause too, and says so.
    answer = second.replay("acme", fleet[1], "r2-" + "0" * 32)
    assert answer.kind.value == "unknown" and "spent until" in (answer.reason or "")


def test_a_held_back_reset_sent_again_waits_in_doubt_for_the_next_sweep(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, fleet: list[str]) -> None:
    """A record whose reset never ran is sent again with the same key; held back, it stays in
    doubt (never dropped) and the next sweep after the window sends that same key: one reset."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    ref = KeyRef("acme", fleet[0])
    record = plant(engine, state, ref, keyservice)
    budget = with_budget(keyservice, state, emulator)
    budget.observe("acme", [(0, 4, 900.0)])  # two calls: the read and the replay
    [held] = engine.recover_all()
    assert held.status == "deferred" and "rotation.failed" not in events.names(), held.reason
    kept = state.get_attempt(ref)
    assert kept is not None and kept.phase == "in_doubt" and kept.epoch == record.epoch
    emulator.clock_offset_s += RATE_WINDOWS_S[0] + 1
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert [e.idempotency_key for e in emulator.ledger] == [engine._key_of(record)]
    keyservice.budget = None
    assert holds_current(sink, emulator, "acme", fleet[0], keyservice) and state.attempts() == []


def test_a_held_back_fresh_reset_after_a_lost_secret_keeps_the_loss(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, fleet: list[str]) -> None:
    """The fresh reset that replaces a lost secret, held back, is not deferred away: the record
    stays (its loss on record), `rotation.secret_at_risk` says so, and the next sweep sends it."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    ref = KeyRef("acme", fleet[0])
    lose_the_answer(engine, state, ref, keyservice, emulator)
    budget = with_budget(keyservice, state, emulator)
    budget.observe("acme", [(0, 6, 900.0)])  # three: two reads and the replay
    [held] = engine.recover_all()
    assert held.status == "at_risk" and "held back" in held.reason, held.reason
    kept = state.get_attempt(ref)
    assert kept is not None and kept.after_loss and kept.phase == "in_doubt"
    assert events.names().count("rotation.secret_at_risk") == 2  # the loss, then the held reset
    emulator.clock_offset_s += RATE_WINDOWS_S[0] + 1
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    keyservice.budget = None
    assert holds_current(sink, emulator, "acme", fleet[0], keyservice) and state.attempts() == []
    assert len(emulator.ledger) == 2  # the lost reset and the one that replaced it


def test_the_commands_stop_at_once_and_say_until_when(tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str,
                                                      emulator: Emulator, emulator_server: EmulatorServer,
                                                      fleet: list[str]) -> None:
    """`rotate --all-due --apply` rotates what the share allows, then stops and lists what it
    deferred and until when (exit 1, nothing failed); `status` and the metrics show the budget;
    `scan` meeting a spent budget stops at once."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry
    from typer.testing import CliRunner

    from rotator.cli import app
    from rotator.config import load_settings
    from rotator.metrics import RotatorCollector

    env.setenv("ROTATOR_STATE__NAMESPACE", f"budget-{uuid.uuid4().hex[:8]}")
    env.setenv("ROTATOR_KEYSERVICE__MAX_SHARE_OF_RATE_LIMIT", "0.5")
    env.setenv("ROTATOR_KEYSERVICE__RATE_LIMIT_RESERVE", "0")
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server)
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0] - 40)
    counted = Counted(emulator)
    runner = CliRunner()
    applied = runner.invoke(app, ["rotate", "--all-due", "--apply", "--config", str(config)])
    assert applied.exit_code == 1, applied.output
    assert counted.calls <= 20 and counted.refused == 0
    assert re.search(r"stopped: \d+ key\(s\) deferred \(acme/key_\w+.*spent until \d{4}-\d\d-\d\dT", applied.stderr)
    assert "succeeded" in applied.stdout and "failed" not in applied.output

    status = runner.invoke(app, ["status", "--config", str(config)])
    assert re.search(r"rate budget acme: window 1: 0 of 19 calls left to rotator", status.stderr), status.stderr
    registry = CollectorRegistry()
    settings = load_settings(config)
    registry.register(RotatorCollector(settings, RedisState.from_url(settings.state.url(), settings.state.namespace)))
    scraped = generate_latest(registry).decode()
    assert 'rotator_rate_budget_calls_left{client_id="acme",window="1"} 0.0' in scraped

    looked = counted.calls  # a person's look goes past the share (not counted by the fleet's budget)
    scanned = runner.invoke(app, ["scan", "--config", str(config)])
    assert scanned.exit_code == 1 and "stopped listing acme" in scanned.stderr, scanned.output
    assert counted.calls == looked  # not one call more


def test_scan_goes_on_without_the_state_store(tmp_path: Path, env: pytest.MonkeyPatch, emulator: Emulator,
                                              emulator_server: EmulatorServer, fleet: list[str]) -> None:
    """`scan` needs no state store but for the budget: with Redis down it lists every key, unmetered,
    and says so once; a rotation could not run without Redis anyway, so only the scan goes on."""
    from typer.testing import CliRunner

    from rotator.cli import app

    config = write_config(tmp_path / "rotator.toml", emulator_server.url, "redis://127.0.0.1:9")
    scanned = CliRunner().invoke(app, ["scan", "--json", "--config", str(config)])
    assert scanned.exit_code == 0, scanned.output
    assert sorted(row["key_id"] for row in json.loads(scanned.stdout)) == sorted(fleet)
    assert scanned.stderr.count("budget.unreachable") == 1


def test_recovery_of_one_client_is_not_held_back_by_anothers_budget_nor_by_the_share(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState) -> None:
    """A reset that ran and whose answer was lost is settled by its replay, however spent the share
    is: the reads that settle it go past the share (a secret depends on them), and a Client ID
    whose own budget is spent holds back only its own keys (attempts are swept in order, and
    `aaa` comes before `bbb`)."""
    now = emulator.now()
    for client in ("aaa", "bbb"):
        emulator.add_client(client, client.upper(), created_at=now - 400 * DAY)
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    stuck = {}
    for client in ("aaa", "bbb"):
        ref = KeyRef(client, emulator.add_key(client, "payouts", created_at=now - 100 * DAY).id)
        record = plant(engine, state, ref, keyservice)
        keyservice.reset_key(ref.client_id, ref.key_id, engine._key_of(record))  # ran; its answer lost
        stuck[client] = ref
    budget = with_budget(keyservice, state, emulator, reserve=0.1)
    budget.observe("aaa", [(2_290, 10, 900.0)], pause_s=600, pause_why="429")  # aaa: paused and spent
    budget.observe("bbb", [(2_299, 1, 900.0)])  # bbb: no share and no reserve left
    results = {r.client_id: r for r in engine.recover_all()}
    assert results["aaa"].status == "deferred" and results["bbb"].status == "recovered", results
    keyservice.budget = None
    assert holds_current(sink, emulator, "bbb", stuck["bbb"].key_id, keyservice)
    assert "rotation.secret_at_risk" not in events.names()


def test_the_budget_runs_on_the_key_services_clock_not_a_hosts(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, fleet: list[str]) -> None:
    """With the key service's clock an hour ahead of every host's, its windows still reset when it
    says: each reset is taken relative to the answer's own `Date`, and the budget reads the state
    store's clock (one for every worker), not a host's."""
    emulator.clock_offset_s = 3_600
    keyservice.budget = RateBudget(state.client, state.ns, share=0.5, reserve=0.0, longest_wait_s=0.2)
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0] - 10)
    with pytest.raises(BudgetSpent) as held:
        for _ in range(10):
            keyservice.get_key("acme", fleet[0])
    assert 890 < held.value.until - state.now() <= 901  # not an hour off


def test_a_held_back_token_check_is_no_failure(emulator: Emulator, keyservice: HttpKeyService,
                                               state: RedisState, fleet: list[str]) -> None:
    """The reset ran and every sink reads the secret back; a token check the budget holds back (a
    429's pause) is not made now, and the rotation is not failed for it."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    budget = with_budget(keyservice, state, emulator)
    reset = keyservice.reset_key

    def then_paused(*args: Any) -> Any:
        issued = reset(*args)
        budget.observe("acme", pause_s=600, pause_why="429")  # another worker's 429, just now
        return issued

    keyservice.reset_key = then_paused  # type: ignore[method-assign]
    result = engine.rotate(KeyRef("acme", fleet[0]), trigger="schedule")
    assert result.status == "succeeded", result.reason
    assert "rotation.failed" not in events.names() and state.attempts() == []


def test_reconcile_repair_says_what_it_did_before_the_budget_stopped_it(
        tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator,
        emulator_server: EmulatorServer, fleet: list[str]) -> None:
    """`reconcile --repair` settles a lost answer, then meets a paused budget in the drift
    comparison: it lists what it repaired and says it stopped, and until when (exit 1)."""
    from typer.testing import CliRunner

    from rotator.cli import app
    from rotator.config import load_settings
    from rotator.runtime import build_engine

    env.setenv("ROTATOR_STATE__NAMESPACE", f"budget-{uuid.uuid4().hex[:8]}")
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server)
    engine = build_engine(load_settings(config))
    ref = KeyRef("acme", fleet[0])
    record = plant(engine, engine.state, ref, engine.keyservice, since=engine.state.now() - 3_600)
    engine.keyservice.reset_key("acme", fleet[0], engine._key_of(record))  # ran; its answer lost
    listing = HttpKeyService.list_keys

    def paused_after_settling(self: HttpKeyService, client_id: str) -> Any:
        self.budget.observe(client_id, pause_s=600, pause_why="429")  # type: ignore[union-attr]
        return listing(self, client_id)

    env.setattr(HttpKeyService, "list_keys", paused_after_settling)
    done = CliRunner().invoke(app, ["reconcile", "--repair", "--json", "--config", str(config)])
    assert done.exit_code == 1, done.output
    report = json.loads(done.stdout)
    assert [(r["key_id"], r["status"]) for r in report["repaired"]] == [(fleet[0], "recovered")]
    assert report["stopped"]["client_id"] == "acme" and "429" in report["stopped"]["reason"]


def test_an_answer_told_late_keeps_to_its_window(emulator: Emulator, keyservice: HttpKeyService,
                                                 second: HttpKeyService, state: RedisState,
                                                 fleet: list[str]) -> None:
    """An answer's windows are told with the process's next call, maybe much later: its reset is
    taken less the time since, so it is the same window (not a new one with its share afresh)."""
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0] - 40)
    with_budget(keyservice, state, emulator)
    with_budget(second, state, emulator)
    counted = Counted(emulator)
    keyservice.get_key("acme", fleet[0])  # A's answer: told with its next call
    with pytest.raises(BudgetSpent):
        for _ in range(40):
            second.get_key("acme", fleet[1])
    emulator.clock_offset_s += 30  # half a minute later, A calls again
    seen, at = keyservice._unreported["acme"]
    keyservice._unreported["acme"] = (seen, at - 30)
    with pytest.raises(BudgetSpent):
        for _ in range(40):
            keyservice.get_key("acme", fleet[0])
    assert counted.calls <= 20, counted.calls


def test_a_held_resend_does_not_hold_back_settling_another_key(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, fleet: list[str]) -> None:
    """Within one Client ID too: a resend the share holds back (a write) leaves the next attempt,
    whose reset ran and whose answer was lost, to be settled by its replay past the share."""
    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink], horizon_s=0.0)
    first, lost = (KeyRef("acme", key_id) for key_id in sorted(fleet[:2]))  # swept in this order
    plant(engine, state, first, keyservice)  # never ran: the sweep sends it again (a write)
    record = plant(engine, state, lost, keyservice)
    keyservice.reset_key("acme", lost.key_id, engine._key_of(record))  # ran; its answer lost
    budget = with_budget(keyservice, state, emulator, reserve=0.1)
    budget.observe("acme", [(2_299, 1, 900.0)])  # no share and no reserve left
    results = {r.key_id: r.status for r in engine.recover_all()}
    assert results == {first.key_id: "deferred", lost.key_id: "recovered"}, results
    keyservice.budget = None
    assert holds_current(sink, emulator, "acme", lost.key_id, keyservice)


def test_a_spent_client_id_is_skipped_and_the_others_scanned(
        tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator,
        emulator_server: EmulatorServer, state: RedisState) -> None:
    """`scan` (and beat's scan, and `rotate --all-due`) skips a Client ID whose budget is spent,
    says so, and lists the others (exit 1)."""
    from typer.testing import CliRunner

    from rotator.cli import app

    now = emulator.now()
    for client in ("aaa", "bbb"):
        emulator.add_client(client, client.upper(), created_at=now - 400 * DAY)
    env.setenv("ROTATOR_STATE__NAMESPACE", state.ns)
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server)
    RateBudget(state.client, state.ns).observe("aaa", pause_s=600, pause_why="429")
    scanned = CliRunner().invoke(app, ["scan", "--json", "--config", str(config)])
    assert scanned.exit_code == 1 and "stopped listing aaa" in scanned.stderr, scanned.output
    assert {row["client_id"] for row in json.loads(scanned.stdout)} == {"bbb"}


def test_a_look_that_meets_a_429_does_not_retry_into_it(emulator: Emulator, keyservice: HttpKeyService,
                                                       state: RedisState, fleet: list[str]) -> None:
    """A person's look writes nothing to the fleet's budget, so it keeps a 429's pause itself:
    one try, then it stops and says until when (not `max_attempts` tries at once)."""
    keyservice.budget = RateBudget(state.client, state.ns, longest_wait_s=0.2).for_people()
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0])
    counted = Counted(emulator)
    with pytest.raises(BudgetSpent, match="429"):
        keyservice.get_key("acme", fleet[0])
    assert (counted.calls, counted.refused) == (1, 1)
    assert state.client.keys(f"{state.ns}:budget:*") == []  # and wrote nothing


def test_a_hostile_date_or_reset_neither_stalls_nor_unmeters_the_budget() -> None:
    """`Date` and `X-RateLimit-Reset` come from an untrusted service: a `Date` a day or more off is
    not the service's clock, a reset beyond a day is no window's, and a time beyond any date is
    said in words, not a crash."""
    from rotator.errors import BudgetSpent as Spent
    from rotator.keyservice.http import _service_time

    assert abs(_service_time("Thu, 01 Jan 1970 00:00:00 GMT") - __import__("time").time()) < 5
    assert abs(_service_time("Fri, 31 Dec 9999 23:59:59 GMT") - __import__("time").time()) < 5
    assert "beyond any date" in str(Spent("acme", 10.0 ** 18, "share:1"))
