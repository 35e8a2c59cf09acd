"""The contract every key-service adapter must keep, as pytest tests a plugin imports and runs.

The engine's promise (never lose a one-time secret, never reset a key twice for one rotation)
rests on what an adapter does with an Idempotency-Key. In the plugin's test module:

    from rotator.keyservice.contract import *  # noqa: F403  (the tests below, collected there)

    @pytest.fixture
    def contract_key() -> Iterator[ContractKey]:
        service = MyKeyService(...)  # against a test instance of the provider
        yield ContractKey(service, client_id="...", key_id="...")  # a key the tests may reset
        service.close()

Each test resets that key at most twice, with Idempotency-Keys of its own. They check what an
adapter does with a working provider; how it judges a failed call (a 4xx refused, anything else
in doubt: `rotator.keyservice.transport.judged`) is for its own tests against injected faults.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass

from rotator.domain import ApiKey, IssuedKey, Replay, Secret
from rotator.errors import RotatorError
from rotator.protocols import KeyService

__all__ = [
    "ContractKey",
    "same",
    "test_a_reset_answers_the_key_with_a_new_generation_and_a_secret",
    "test_a_reset_sent_again_with_its_key_is_the_same_reset",
    "test_a_used_key_replays_the_answer",
    "test_an_unused_key_replays_nothing",
    "test_the_keys_are_listed_as_they_are_read",
    "test_the_new_secret_authenticates_and_never_prints",
]


@dataclass(frozen=True)
class ContractKey:
    """The adapter under test and one key of a test instance that the tests may reset."""

    service: KeyService
    client_id: str
    key_id: str

    def read(self) -> ApiKey:
        return self.service.get_key(self.client_id, self.key_id)

    def reset(self, idempotency_key: str) -> IssuedKey:
        return self.service.reset_key(self.client_id, self.key_id, idempotency_key)


def same(a: Secret, b: Secret) -> bool:
    """Whether two secrets are equal, as a bool: an assert on it never prints either."""
    return hmac.compare_digest(a.reveal().encode(), b.reveal().encode())


def fresh_key() -> str:
    """An Idempotency-Key nobody has used (35 characters of [a-z0-9-], like the engine's)."""
    return "t2-" + uuid.uuid4().hex


def test_the_keys_are_listed_as_they_are_read(contract_key: ContractKey) -> None:
    """The key is listed under its client, and reading it gives what the listing said."""
    clients = [c.client_id for c in contract_key.service.list_clients()]
    assert contract_key.client_id in clients
    listed = {k.key_id: k for k in contract_key.service.list_keys(contract_key.client_id)}
    assert contract_key.key_id in listed
    read = contract_key.read()
    assert (read.key_id, read.generation, read.environment) == (
        listed[contract_key.key_id].key_id, listed[contract_key.key_id].generation,
        listed[contract_key.key_id].environment)


def test_a_reset_answers_the_key_with_a_new_generation_and_a_secret(contract_key: ContractKey) -> None:
    """A reset names the key it reset, moves its generation (the engine's Idempotency-Keys are
    derived from it) and returns the secret as a `Secret`, never a plain string."""
    before = contract_key.read()
    issued = contract_key.reset(fresh_key())
    assert issued.key.key_id == contract_key.key_id and issued.key.generation > before.generation
    assert isinstance(issued.secret, Secret) and issued.secret.reveal()
    assert contract_key.read().generation == issued.key.generation


def test_a_reset_sent_again_with_its_key_is_the_same_reset(contract_key: ContractKey) -> None:
    """The retry of a reset whose answer was lost: the same Idempotency-Key gives the same secret
    and resets nothing more (a worker that crashed after the reset recovers this way)."""
    key = fresh_key()
    first = contract_key.reset(key)
    again = contract_key.reset(key)
    assert same(again.secret, first.secret), "the same Idempotency-Key gave another secret: a second reset"
    assert contract_key.read().generation == first.key.generation


def test_a_used_key_replays_the_answer(contract_key: ContractKey) -> None:
    """`replay` returns the stored answer of a used Idempotency-Key: the same secret, for as long as
    the provider keeps it (recovery after a lost answer, even with Redis lost)."""
    key = fresh_key()
    issued = contract_key.reset(key)
    answer = contract_key.service.replay(contract_key.client_id, contract_key.key_id, key)
    assert answer.kind is Replay.ANSWER and answer.issued is not None
    assert same(answer.issued.secret, issued.secret), "the replay gave another secret than the reset"
    assert answer.issued.key.generation == issued.key.generation


def test_an_unused_key_replays_nothing(contract_key: ContractKey) -> None:
    """An Idempotency-Key never sent replays as EMPTY, never as an error that reads like "failed"
    (UNKNOWN would leave every such attempt in doubt) and never raises."""
    answer = contract_key.service.replay(contract_key.client_id, contract_key.key_id, fresh_key())
    assert answer.kind is Replay.EMPTY, answer.reason


def test_the_new_secret_authenticates_and_never_prints(contract_key: ContractKey) -> None:
    """The token check passes for the new secret and fails for the one it replaced (a reset kills
    it at once) and for a made-up one; no error or repr of the answer shows the secret."""
    old = contract_key.reset(fresh_key())
    issued = contract_key.reset(fresh_key())
    secret = issued.secret.reveal()
    verify = contract_key.service.verify_secret
    assert verify(contract_key.client_id, issued.secret, key_id=contract_key.key_id)
    assert not verify(contract_key.client_id, old.secret, key_id=contract_key.key_id), "the old secret still works"
    assert not verify(contract_key.client_id, Secret("made-up-" + uuid.uuid4().hex), key_id=contract_key.key_id)
    assert secret not in repr(issued) and secret not in str(issued.secret)
    try:
        contract_key.service.get_key(contract_key.client_id, contract_key.key_id + "-no-such-key")
    except RotatorError as exc:
        assert secret not in str(exc)
