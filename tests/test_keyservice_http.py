"""The HTTP adapter against the emulator over real HTTP, with injected faults."""

from __future__ import annotations

import time

import httpx
import pytest

from rotator.domain import Environment, Replay, Scope, Secret
from rotator.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InDoubtError,
    NotFoundError,
    ProtocolError,
    RefusedError,
    TransientError,
)
from rotator.keyservice.emulator import AUTO_ALIAS, Emulator, Fault
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService

IDEM = "attempt-0000000000000001"


def seed(emulator: Emulator, keys: int = 3, env: str = "PRODUCTION", client: str = "acme") -> list[str]:
    """A client with its auto-generated key first, then `keys` more; returns every key id."""
    auto = [*emulator.add_client(client, "Acme", env, created_at=emulator.now() - 1000).keys]
    return auto + [emulator.add_key(client, f"k{i}", created_at=emulator.now() - 900 + i).id for i in range(keys)]


def test_pagination_streams_three_pages(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """25 keys at 10 a page arrive in order over 3 pages, each requested once."""
    seed(emulator, keys=24)
    keyservice.per_page = 10
    keys = list(keyservice.list_keys("acme"))
    assert len(keys) == 25
    assert keys[0].alias == AUTO_ALIAS and keys[0].is_auto_generated
    assert [k.created_at for k in keys] == sorted(k.created_at for k in keys)
    assert len({k.key_id for k in keys}) == 25


def test_pagination_is_lazy(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    """Only the pages the caller consumes are fetched."""
    seed(emulator, keys=29)
    requests: list[str] = []
    transport = httpx.HTTPTransport()

    class Counting(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            requests.append(str(request.url))
            return transport.handle_request(request)

    with HttpKeyService(emulator_server.url, emulator.token, per_page=10, transport=Counting()) as ks:
        it = ks.list_keys("acme")
        [next(it) for _ in range(10)]
        assert len(requests) == 1
        list(it)
        assert len(requests) == 3


def test_rate_limit_then_success(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """A 429 with Retry-After is waited out and the call succeeds."""
    seed(emulator, keys=0)
    emulator.add_fault(Fault(method="GET", path="/apikeys$", status=429, retry_after=0, times=2))
    assert len(list(keyservice.list_keys("acme"))) == 1


def test_dropped_reset_answer_is_replayed_not_reset_again(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """The reset commits, the answer is lost; the retry with the same key gets the same secret."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="after"))
    issued = keyservice.reset_key("acme", key_id, IDEM)
    assert len(emulator.ledger) == 1
    assert issued.secret.reveal() == emulator.current_secret("acme", key_id)
    assert keyservice.verify_secret("acme", issued.secret)


def test_repeated_idempotency_key_gives_the_same_answer(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Two resets with one Idempotency-Key run once; GET /responses/{key} returns it too."""
    key_id = seed(emulator, keys=1)[1]
    first = keyservice.reset_key("acme", key_id, IDEM)
    second = keyservice.reset_key("acme", key_id, IDEM)
    replayed = keyservice.replay("acme", key_id, IDEM)
    assert len(emulator.ledger) == 1
    assert first.secret == second.secret
    assert replayed.kind is Replay.ANSWER and replayed.issued is not None and replayed.issued.secret == first.secret
    assert keyservice.replay("acme", key_id, "never-used-key-000000").kind is Replay.EMPTY


def test_idempotency_key_on_another_path_is_blocked_and_settles_nothing(
        emulator: Emulator, keyservice: HttpKeyService) -> None:
    """The same key on another path is blocked (409 idempotent_creation_conflict) and its stored answer
    is another request's: in doubt, never a refusal (which would move to the next key) nor a reset."""
    ids = seed(emulator, keys=2)
    keyservice.reset_key("acme", ids[1], IDEM)
    with pytest.raises(InDoubtError, match="idempotent_creation_conflict.*another request"):
        keyservice.reset_key("acme", ids[2], IDEM)
    assert len(emulator.ledger) == 1
    assert keyservice.replay("acme", ids[2], IDEM).kind is Replay.UNKNOWN


def test_legacy_wire_idempotency_key_on_another_path_conflicts(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """The legacy emulator answers the same key on another path with a plain 409 conflict: refused."""
    emulator.wire = "legacy"
    ids = seed(emulator, keys=2)
    keyservice.reset_key("acme", ids[1], IDEM)
    with pytest.raises(RefusedError, match="409") as info:
        keyservice.reset_key("acme", ids[2], IDEM)
    assert info.value.status == 409 and len(emulator.ledger) == 1
    assert keyservice.replay("acme", ids[2], IDEM).kind is Replay.UNKNOWN


def test_replay_expires_after_24_hours(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """Past 24 h the stored answer is gone: replay says None."""
    key_id = seed(emulator, keys=1)[1]
    keyservice.reset_key("acme", key_id, IDEM)
    emulator.clock_offset_s = 24 * 3600 + 1
    assert keyservice.replay("acme", key_id, IDEM).kind is Replay.EMPTY


def test_server_errors_exhausted_leave_a_reset_in_doubt_naming_path(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Every try answered 500: a 5xx proves nothing about a write, so the reset is in doubt (a
    TransientError naming the method and path), after max_attempts with one key."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="POST", path="/reset$", status=500, times=-1))
    with pytest.raises(InDoubtError) as info:
        keyservice.reset_key("acme", key_id, IDEM)
    assert isinstance(info.value, TransientError)
    assert f"POST /v2.01/acme/apikeys/{key_id}/reset" in str(info.value)
    assert "after 4 attempts; outcome unknown" in str(info.value)
    assert emulator.ledger == []


def test_a_gateway_5xx_while_the_origin_commits_is_in_doubt_and_replayable(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """A 504 from a gateway while the origin commits: in doubt, then the replay has the answer."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="POST", path="/reset$", status=504, commit_after_s=0.3))
    emulator.add_fault(Fault(method="POST", path="/reset$", status=502, times=10))
    with pytest.raises(InDoubtError):
        keyservice.reset_key("acme", key_id, IDEM)
    deadline = time.monotonic() + 5
    while not emulator.ledger and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = keyservice.replay("acme", key_id, IDEM)
    assert answer.kind is Replay.ANSWER and answer.issued is not None
    assert answer.issued.secret.reveal() == emulator.current_secret("acme", key_id)
    assert len(emulator.ledger) == 1


def test_only_a_4xx_refuses_a_reset(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """403 and 429 prove the reset did not run (RefusedError); a 409 with Retry-After (the same key
    still running) and a cut 200 do not (InDoubtError)."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403))
    with pytest.raises(RefusedError):
        keyservice.reset_key("acme", key_id, "refused-key-0000000001")
    emulator.add_fault(Fault(method="POST", path="/reset$", status=429, retry_after=0, times=10))
    with pytest.raises(RefusedError):
        keyservice.reset_key("acme", key_id, "refused-key-0000000002")
    emulator.clear_faults()
    emulator.add_fault(Fault(method="POST", path="/reset$", status=409, retry_after=0, times=10))
    with pytest.raises(InDoubtError):
        keyservice.reset_key("acme", key_id, "refused-key-0000000003")
    emulator.clear_faults()
    emulator.add_fault(Fault(method="POST", path="/reset$", body='{"Id": "cut'))
    with pytest.raises(InDoubtError):
        keyservice.reset_key("acme", key_id, "refused-key-0000000004")
    assert emulator.ledger == []


def test_timeout_is_transient(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    """A hang longer than the time-out becomes a TransientError naming the path."""
    seed(emulator, keys=0)
    emulator.add_fault(Fault(method="GET", path="/apikeys$", delay_s=1.0, times=-1))
    with HttpKeyService(emulator_server.url, emulator.token, timeout_s=0.2, max_attempts=2,
                        retry_initial_s=0.01) as ks, pytest.raises(TransientError, match="no answer within"):
        list(ks.list_keys("acme"))


def test_malformed_json_is_a_clear_protocol_error(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """A 200 that is not JSON: a ProtocolError naming path and size, not the body."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="GET", path=f"/apikeys/{key_id}$", body='{"Id": "x", "Secret": "leak'))
    with pytest.raises(ProtocolError) as info:
        keyservice.get_key("acme", key_id)
    assert "not valid JSON" in str(info.value) and f"/apikeys/{key_id}" in str(info.value)
    assert "leak" not in str(info.value)


def test_json_missing_fields_is_a_protocol_error(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """JSON of the wrong shape names the missing field."""
    key_id = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="GET", path=f"/apikeys/{key_id}$", body='{"Id": "x"}'))
    with pytest.raises(ProtocolError, match="'ClientId'"):
        keyservice.get_key("acme", key_id)


def test_wrong_management_token_is_permanent(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    """401 is an AuthenticationError, not retried, and the token is not in the message."""
    seed(emulator, keys=0)
    with HttpKeyService(emulator_server.url, "wrong-token-value", max_attempts=3) as ks, \
            pytest.raises(AuthenticationError) as info:
        list(ks.list_clients())
    assert "401" in str(info.value) and "wrong-token-value" not in str(info.value)


def test_missing_key_is_not_found(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """An unknown key is a NotFoundError."""
    seed(emulator, keys=0)
    with pytest.raises(NotFoundError):
        keyservice.get_key("acme", "key_nope")


def test_production_secret_shown_once_sandbox_readable(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """A production secret cannot be read again (403); a sandbox one can."""
    prod = seed(emulator, keys=1)[1]
    sbx = seed(emulator, keys=1, env="SANDBOX", client="acme-sbx")[1]
    with pytest.raises(ForbiddenError):
        keyservice.read_sandbox_secret("acme", prod)
    secret = keyservice.read_sandbox_secret("acme-sbx", sbx)
    assert secret.reveal() == emulator.current_secret("acme-sbx", sbx)


def test_create_revoke_and_auto_generated_key(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """A created key works and can be revoked; the auto-generated key cannot be revoked."""
    seed(emulator, keys=0)
    issued = keyservice.create_key("acme", "payments", (Scope("Payins", True, False),),
                                   "create-000000000000001")
    assert issued.key.scopes == (Scope("Payins", True, False),)
    assert issued.key.environment is Environment.PRODUCTION
    assert keyservice.verify_secret("acme", issued.secret)
    keyservice.revoke_key("acme", issued.key.key_id)
    assert not keyservice.verify_secret("acme", issued.secret)
    auto = next(iter(keyservice.list_keys("acme")))
    with pytest.raises(ConflictError, match="409"):
        keyservice.revoke_key("acme", auto.key_id)


def test_old_secret_stops_working_after_reset(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """Reset kills the previous secret at once; the new one authenticates."""
    key_id = seed(emulator, keys=1)[1]
    old = Secret(emulator.current_secret("acme", key_id))
    new = keyservice.reset_key("acme", key_id, IDEM)
    assert not keyservice.verify_secret("acme", old)
    assert keyservice.verify_secret("acme", new.secret)
    assert new.key.last_reset_at == emulator.now() or new.key.last_reset_at is not None


def test_control_surface_over_http(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    """Faults, clock and ledger can be driven over HTTP with the management token."""
    key_id = seed(emulator, keys=1)[1]
    headers = {"Authorization": f"Bearer {emulator.token}"}
    with httpx.Client(base_url=emulator_server.url, headers=headers) as http:
        assert http.post("/_emulator/faults", json={"method": "GET", "path": "/clients$",
                                                    "status": 503}).status_code == 204
        assert http.get("/v2.01/clients").status_code == 503
        assert http.get("/v2.01/clients").status_code == 200
        http.post(f"/v2.01/acme/apikeys/{key_id}/reset")
        assert [e["key_id"] for e in http.get("/_emulator/ledger").json()] == [key_id]
        now = http.post("/_emulator/clock", json={"offset_s": 3600}).json()["now"]
        assert now == emulator.now()
        assert http.get("/_emulator/ledger", headers={"Authorization": "Bearer x"}).status_code == 401


def test_error_body_follows_the_contract(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    """Errors carry Id, Type, Message and Date; bad paging is a param_error."""
    seed(emulator, keys=0)
    with httpx.Client(base_url=emulator_server.url,
                      headers={"Authorization": f"Bearer {emulator.token}"}) as http:
        answer = http.get("/v2.01/acme/apikeys", params={"per_page": 101})
        body = answer.json()
        assert answer.status_code == 400 and body["Type"] == "param_error"
        assert set(body) >= {"Id", "Type", "Message", "Date"}
        page = http.get("/v2.01/acme/apikeys", params={"page": 5})
        assert page.json() == [] and page.headers["X-Number-Of-Items"] == "1"


# --- successor keys ("Replaces") ----------------------------------------------------------------------

SCOPES = (Scope("Payins", True, True),)


def test_a_successor_shares_the_alias_until_the_replaced_key_is_revoked(
    emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """create_key(replaces=K) makes N with K's alias and Replaces=K; K shows ReplacedBy=N and lists
    first; revoking K clears N's Replaces, N keeps the alias, and the alias is unique again."""
    old = seed(emulator, keys=1)[1]
    issued = keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000001", replaces=old)
    new = issued.key
    assert (new.alias, new.replaces, new.replaced_by) == ("k0", old, None)
    assert keyservice.verify_secret("acme", issued.secret, key_id=new.key_id)
    assert keyservice.get_key("acme", old).replaced_by == new.key_id
    listed = [k.key_id for k in keyservice.list_keys("acme")]
    assert listed.index(old) < listed.index(new.key_id)
    keyservice.revoke_key("acme", old)
    after = keyservice.get_key("acme", new.key_id)
    assert (after.alias, after.replaces, after.replaced_by) == ("k0", None, None)
    with pytest.raises(NotFoundError):
        keyservice.revoke_key("acme", old)
    with pytest.raises(RefusedError) as info:
        keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000002")
    assert info.value.status == 409


def test_successor_rules_refuse_with_4xx(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """Unknown or revoked Replaces: 404; the auto-generated key: 409; another alias: 400; a second
    successor, or a successor of a key that itself still replaces one: 409. Revoking the successor
    lets the key get a new one."""
    auto, old = seed(emulator, keys=1)
    cases = [("key_nope", "k0", 404), (auto, AUTO_ALIAS, 409), (old, "other alias", 400)]
    for n, (replaces, alias, status) in enumerate(cases):
        with pytest.raises(RefusedError) as info:
            keyservice.create_key("acme", alias, SCOPES, f"refused-create-{n:08d}", replaces=replaces)
        assert info.value.status == status
    first = keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000001", replaces=old).key
    for n, replaces in enumerate((old, first.key_id)):
        with pytest.raises(RefusedError) as info:
            keyservice.create_key("acme", "k0", SCOPES, f"second-create-{n:08d}", replaces=replaces)
        assert info.value.status == 409
    keyservice.revoke_key("acme", first.key_id)
    assert keyservice.get_key("acme", old).replaced_by is None
    second = keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000002", replaces=old).key
    assert second.replaces == old and keyservice.get_key("acme", old).replaced_by == second.key_id


def test_a_create_is_classified_like_a_reset(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """A dropped answer is replayed on retry (one key made); a 403 refuses; 5xx on every try, a
    409 with Retry-After or a cut 200 leave it in doubt."""
    old = seed(emulator, keys=1)[1]
    emulator.add_fault(Fault(method="POST", path="/apikeys$", drop="after"))
    issued = keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000001", replaces=old)
    assert issued.secret.reveal() == emulator.current_secret("acme", issued.key.key_id)
    assert len(list(keyservice.list_keys("acme"))) == 3
    emulator.add_fault(Fault(method="POST", path="/apikeys$", status=403))
    with pytest.raises(RefusedError):
        keyservice.create_key("acme", "fresh", SCOPES, "create-0000000000000002")
    for fault in (Fault(method="POST", path="/apikeys$", status=500, times=-1),
                  Fault(method="POST", path="/apikeys$", status=409, retry_after=0, times=-1),
                  Fault(method="POST", path="/apikeys$", body='{"Id": "cut')):
        emulator.clear_faults()
        emulator.add_fault(fault)
        with pytest.raises(InDoubtError):
            keyservice.create_key("acme", "fresh", SCOPES, "create-0000000000000003")
    assert len(list(keyservice.list_keys("acme"))) == 3


def test_replay_create_answer_refused_empty_unknown(emulator: Emulator, keyservice: HttpKeyService) -> None:
    """The stored create of K's successor is the answer (with its secret); a stored 404 is a refusal;
    nothing stored is empty; a reset stored under the key, a create of another key's successor, or a
    5xx of the replay prove nothing."""
    _, old, other = seed(emulator, keys=2)
    made = keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000001", replaces=old)
    answer = keyservice.replay_create("acme", old, "create-0000000000000001")
    assert answer.kind is Replay.ANSWER and answer.issued is not None
    assert answer.issued.secret == made.secret and answer.issued.key.replaces == old
    assert keyservice.replay_create("acme", other, "create-0000000000000001").kind is Replay.UNKNOWN
    with pytest.raises(RefusedError):
        keyservice.create_key("acme", "k0", SCOPES, "create-0000000000000002", replaces="key_nope")
    assert keyservice.replay_create("acme", "key_nope", "create-0000000000000002").kind is Replay.REFUSED
    assert keyservice.replay_create("acme", old, "never-used-key-000000").kind is Replay.EMPTY
    keyservice.reset_key("acme", other, IDEM)
    unknown = keyservice.replay_create("acme", other, IDEM)
    assert unknown.kind is Replay.UNKNOWN and "another request" in unknown.reason
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=-1))
    assert keyservice.replay_create("acme", old, "create-0000000000000001").kind is Replay.UNKNOWN
