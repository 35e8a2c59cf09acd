"""The contract a key-service adapter must keep (`rotator.keyservice.contract`), run the way a
plugin runs it: imported into a test module that provides `contract_key`. Here, against the
built-in HTTP adapter and the emulator over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rotator.keyservice.contract import *  # noqa: F403 - the contract's tests, collected here
from rotator.keyservice.contract import ContractKey
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.http import HttpKeyService
from tests.conftest import TOKEN


@pytest.fixture
def contract_key(emulator: Emulator, emulator_server: object) -> Iterator[ContractKey]:
    now = emulator.now()
    client = emulator.add_client("contract", "Contract", created_at=now - 400 * 86_400)
    with HttpKeyService(emulator_server.url, TOKEN, timeout_s=2, max_attempts=3,  # type: ignore[attr-defined]
                        retry_initial_s=0.01, retry_max_wait_s=0.1) as service:
        yield ContractKey(service, "contract", next(iter(client.keys)))


def test_the_contract_catches_an_adapter_that_resets_again(emulator: Emulator, emulator_server: object) -> None:
    """The shipped tests are not a formality: an adapter that sends a fresh Idempotency-Key on
    every call (so a retry resets the key a second time) fails the contract."""
    from rotator.keyservice import contract

    class ResetsAgain(HttpKeyService):
        def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> object:  # type: ignore[override]
            return super().reset_key(client_id, key_id, contract.fresh_key())

    now = emulator.now()
    client = emulator.add_client("careless", "Careless", created_at=now - 400 * 86_400)
    with ResetsAgain(emulator_server.url, TOKEN, timeout_s=2, max_attempts=2) as service:  # type: ignore[attr-defined]
        key = ContractKey(service, "careless", next(iter(client.keys)))
        with pytest.raises(AssertionError):
            contract.test_a_reset_sent_again_with_its_key_is_the_same_reset(key)
