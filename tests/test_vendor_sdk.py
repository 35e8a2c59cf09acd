"""The payment API's own Python SDK (mangopay4-python-sdk) as a client of the emulator: where the
SDK and the published docs disagree with the emulator, the emulator is wrong.

The SDK authenticates with an OAuth token; the emulator's management calls take the management
token, so the SDK is handed that token through its token-storage hook. Its OAuth request (a JSON
body under a form content type, as the real API accepts) is tested on its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mangopay
import pytest
import requests
from mangopay.api import APIRequest
from mangopay.auth import StorageStrategyBase
from mangopay.exceptions import APIError
from mangopay.resources import IdempotencyResponse
from mangopay.signals import request_started

from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService

IDEM = "r2-0123456789abcdef0123456789abcdef"


class ManagementToken(StorageStrategyBase):
    """The SDK's token cache, holding the management token instead of an OAuth one."""

    def __init__(self, token: str) -> None:
        self.token = {"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                      "timestamp": time.time() + 3600}

    def get(self, env_key: str) -> dict[str, Any]:
        return self.token

    def store(self, token: Any, env_key: str) -> None:
        raise AssertionError("the SDK asked for an OAuth token although it holds one")


def sdk(server: EmulatorServer, client_id: str, apikey: str, storage: StorageStrategyBase | None = None) -> APIRequest:
    return APIRequest(client_id=client_id, apikey=apikey, api_url=f"{server.url}/v2.01/", sandbox=False,
                      storage_strategy=storage, timeout=5)


@pytest.fixture
def reset(emulator: Emulator, emulator_server: EmulatorServer, keyservice: HttpKeyService) -> tuple[str, str]:
    """A production key of `acme` reset by rotator's adapter under IDEM: (key id, its new secret)."""
    emulator.add_client("acme", auto_key=False)
    key = emulator.add_key("acme", "payments", created_at=emulator.now() - 100 * 86_400).id
    return key, keyservice.reset_key("acme", key, IDEM).secret.reveal()


@pytest.fixture
def urls() -> Iterator[list[str]]:
    """Every URL the SDK requests (its own `request_started` signal)."""
    seen: list[str] = []

    def record(sender: Any = None, **kwargs: Any) -> None:
        seen.append(kwargs["url"])
    request_started.connect(record)
    yield seen
    request_started.disconnect(record)


def as_default(monkeypatch: pytest.MonkeyPatch, handler: APIRequest) -> None:
    """`IdempotencyResponse.get` uses the SDK's default handler, as an application's code would."""
    monkeypatch.setattr(mangopay.query, "get_default_handler", lambda: handler)


def test_the_sdk_reads_a_stored_reset(emulator: Emulator, emulator_server: EmulatorServer,
                                      reset: tuple[str, str], urls: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`IdempotencyResponse.get` (which asks for `/responses//{key}`) gets the stored reset, with
    string StatusCode and ContentLength and an HTTP date, as the SDK's model declares them."""
    key, secret = reset
    as_default(monkeypatch, sdk(emulator_server, "acme", "unused", ManagementToken(emulator.token)))
    stored = IdempotencyResponse.get(IDEM)
    assert urls == [f"{emulator_server.url}/v2.01/acme/responses//{IDEM}"]
    assert (stored.status, stored.content_type) == ("200", "application/json; charset=utf-8")
    assert stored.content_length.isdigit() and stored.date.endswith(" GMT")
    assert stored.resource["Id"] == key and stored.resource["Secret"] == secret


def test_the_sdk_gets_correlationid_not_found_for_an_unknown_key(
        emulator: Emulator, emulator_server: EmulatorServer, reset: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own live test asks for `key + '_no'` (outside the key alphabet) and expects its
    APIError with code 400 and Type correlationid_not_found."""
    as_default(monkeypatch, sdk(emulator_server, "acme", "unused", ManagementToken(emulator.token)))
    with pytest.raises(APIError) as info:
        IdempotencyResponse.get(IDEM + "_no")
    assert info.value.code == 400 and info.value.content["Type"] == "correlationid_not_found"
    with pytest.raises(APIError) as never_used:
        IdempotencyResponse.get("r2-ffffffffffffffffffffffffffffffff")
    assert never_used.value.code == 400 and never_used.value.content["errors"] is None


def test_the_sdk_gets_an_oauth_token_with_the_new_secret(emulator_server: EmulatorServer,
                                                         reset: tuple[str, str]) -> None:
    """The SDK's OAuth request (Basic credentials, a JSON body under a form content type) is
    accepted with the secret the reset issued, and refused with any other."""
    _, secret = reset
    answer, token = sdk(emulator_server, "acme", secret).auth_manager.authorization.oauth_token()
    assert answer.status_code == 200 and token["access_token"] and token["token_type"] == "bearer"
    with pytest.raises(APIError) as info:
        sdk(emulator_server, "acme", secret + "x").auth_manager.authorization.oauth_token()
    assert info.value.code == 401


def test_an_oauth_token_never_reads_a_stored_answer(emulator: Emulator, emulator_server: EmulatorServer,
                                                    reset: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A key's OAuth token is no management token: the stored answer (another key's secret, or its
    own) is not served to it, through the SDK or by hand."""
    emulator.add_key("acme", "other")
    other = next(k for k in emulator.keys_page("acme", 1, 100)[0] if k["Alias"] == "other")
    other_secret = emulator.current_secret("acme", other["Id"])
    handler = sdk(emulator_server, "acme", other_secret)  # the SDK's default: fetch an OAuth token
    as_default(monkeypatch, handler)
    with pytest.raises(APIError) as info:
        IdempotencyResponse.get(IDEM)
    assert info.value.code == 401 and reset[1] not in str(info.value.content)
    _, token = handler.auth_manager.authorization.oauth_token()
    url = f"{emulator_server.url}/v2.01/acme/responses/{IDEM}"
    direct = requests.get(url, timeout=5, headers={"Authorization": f"Bearer {token['access_token']}"})
    assert direct.status_code == 401 and reset[1] not in direct.text
    managed = requests.get(url, timeout=5, headers={"Authorization": f"Bearer {emulator.token}"})
    assert managed.json()["Resource"]["Secret"] == reset[1]  # the same request with the management token
