"""The key service's rate limit as published (docs/keyservice-api.md, "Rate limits"): every answer of
a Client ID's call carries its windows (calls made, calls left, reset time) for 15 minutes, 30
minutes, an hour and a day, and past any window the call is refused with `429 rate_limit` and
`Retry-After`. The emulator answers so, the adapter reads it, and the payment API's own SDK reads
the emulator's headers as it reads the real API's."""

from __future__ import annotations

import httpx
import pytest

from rotator.errors import ThrottledError
from rotator.keyservice.emulator import DEFAULT_RATE_LIMITS, RATE_WINDOWS_S, Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService, RateWindow, rate_windows
from tests.conftest import TOKEN


def test_every_answer_carries_the_windows_and_a_full_window_refuses(emulator: Emulator,
                                                                    emulator_server: EmulatorServer) -> None:
    emulator.add_client("acme", "Acme")
    now = emulator.now()
    with httpx.Client(base_url=emulator_server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        first = http.get("/v2.01/acme/apikeys")
        assert first.status_code == 200
        assert first.headers["X-RateLimit"] == "1,1,1,1"
        assert first.headers["X-RateLimit-Remaining"] == ",".join(str(n - 1) for n in DEFAULT_RATE_LIMITS)
        resets = [int(v) for v in first.headers["X-RateLimit-Reset"].split(",")]
        assert [r - now for r in resets] == pytest.approx(list(RATE_WINDOWS_S), abs=2)
        assert "X-RateLimit" not in http.get("/v2.01/clients").headers  # no Client ID named: not counted

        emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0] - 2)  # the platform's own payments
        assert http.get("/v2.01/acme/apikeys").headers["X-RateLimit-Remaining"].split(",")[0] == "0"
        refused = http.get("/v2.01/acme/apikeys")
        assert refused.status_code == 429 and refused.json()["Type"] == "rate_limit"
        assert 0 < int(refused.headers["Retry-After"]) <= RATE_WINDOWS_S[0]
        assert refused.headers["X-RateLimit"].split(",")[0] == str(DEFAULT_RATE_LIMITS[0])  # not counted
        emulator.clock_offset_s += RATE_WINDOWS_S[0] + 1  # the 15-minute window starts again
        again = http.get("/v2.01/acme/apikeys")
        assert again.status_code == 200 and again.headers["X-RateLimit"].split(",")[:2] == ["1", str(
            DEFAULT_RATE_LIMITS[0] + 1)]


def test_the_adapter_keeps_the_windows_each_client_answered(emulator: Emulator, keyservice: HttpKeyService) -> None:
    emulator.add_client("acme", "Acme")
    list(keyservice.list_keys("acme"))
    windows = keyservice.rate_limits["acme"]
    assert [w.made for w in windows] == [1, 1, 1, 1]
    assert [w.left for w in windows] == [n - 1 for n in DEFAULT_RATE_LIMITS]
    emulator.spend_calls("acme", DEFAULT_RATE_LIMITS[0])
    with pytest.raises(ThrottledError, match="429 rate_limit"):
        keyservice.get_key("acme", next(iter(emulator._clients["acme"].keys)))
    assert keyservice.rate_limits["acme"][0].left == 0  # the 429's own windows: the one that shows none left


def test_only_a_clients_own_calls_count(emulator: Emulator, emulator_server: EmulatorServer,
                                        keyservice: HttpKeyService) -> None:
    """A call refused for its credentials, or naming no client the service has, counts for nobody;
    a Client ID's OAuth token call (rotator's check of a new secret) counts for it."""
    from rotator.domain import Secret

    client = emulator.add_client("acme", "Acme")
    with httpx.Client(base_url=emulator_server.url) as http:
        anonymous = http.get("/v2.01/acme/apikeys")
        assert anonymous.status_code == 401 and "X-RateLimit" not in anonymous.headers
        assert http.get("/v2.01/ghost/apikeys", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    key = next(iter(client.keys))
    keyservice.verify_secret("acme", Secret(emulator.current_secret("acme", key)), key_id=key)
    list(keyservice.list_keys("acme"))
    assert [w.made for w in keyservice.rate_limits["acme"]] == [2, 2, 2, 2]  # the token call, then the listing


@pytest.mark.parametrize(("made", "left", "reset", "expected"), [
    ("1,2,3,4", "9,8,7,6", "100,200,300,400",
     [RateWindow(1, 9, 100), RateWindow(2, 8, 200), RateWindow(3, 7, 300), RateWindow(4, 6, 400)]),
    ("1, 2", "9 ,8", "100,200", [RateWindow(1, 9, 100), RateWindow(2, 8, 200)]),  # fewer windows, spaces
    ("1,2,3,4,5", "9,8,7,6,5", "1,2,3,4", [RateWindow(1, 9, 1), RateWindow(2, 8, 2), RateWindow(3, 7, 3),
                                           RateWindow(4, 6, 4)]),  # a header with more values than the others
    ("1,x,3", "9,8,7", "1,2,3", [RateWindow(1, 9, 1)]),  # up to the first value that is no count
    ("-1", "9", "1", []), ("1e3", "9", "1", []), ("", "", "", []), ("9" * 19, "1", "1", []),
])
def test_the_headers_are_read_tolerantly(made: str, left: str, reset: str, expected: list[RateWindow]) -> None:
    headers = httpx.Headers({"X-RateLimit": made, "X-RateLimit-Remaining": left, "X-RateLimit-Reset": reset})
    assert list(rate_windows(headers)) == expected
    assert rate_windows(httpx.Headers({"X-RateLimit": "1"})) == ()  # one header alone says nothing


def test_the_payment_apis_sdk_reads_the_emulators_windows(emulator: Emulator, emulator_server: EmulatorServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK infers each window's length from its reset time: 15, 30, 60 and 1,440 minutes."""
    from tests.test_vendor_sdk import ManagementToken, sdk

    emulator.add_client("acme", "Acme")
    handler = sdk(emulator_server, "acme", "unused", ManagementToken(TOKEN))
    handler.request("GET", "/apikeys")  # the SDK prefixes its API URL and the Client ID
    limits = handler.get_rate_limits()
    assert [(r.interval_minutes, r.calls_made, r.calls_remaining) for r in limits] == [
        (minutes, 1, limit - 1) for minutes, limit in zip((15, 30, 60, 1440), DEFAULT_RATE_LIMITS, strict=True)]


def test_an_emulator_without_limits_sends_no_headers(emulator: Emulator, emulator_server: EmulatorServer) -> None:
    emulator.rate_limits = None
    emulator.add_client("acme", "Acme")
    with HttpKeyService(emulator_server.url, TOKEN) as service:
        list(service.list_keys("acme"))
        assert service.rate_limits == {}


def test_the_limits_are_set_over_the_control_api_and_the_command_line(emulator: Emulator,
                                                                      emulator_server: EmulatorServer) -> None:
    """`POST /_emulator/rate` sets the limits (or none) and the calls already spent; `rotator
    emulator --rate-limits` takes the same counts, or `off`, and refuses anything else in one line."""
    from typer.testing import CliRunner

    from rotator.cli import app
    from rotator.keyservice.emulator_http import parse_rate_limits

    emulator.add_client("acme", "Acme")
    with httpx.Client(base_url=emulator_server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert http.post("/_emulator/rate", json={"limits": [3, 10, 100, 1000], "spend": {"acme": 2}}).status_code \
            == 204
        answer = http.get("/v2.01/acme/apikeys")
        assert answer.headers["X-RateLimit-Remaining"] == "0,7,97,997"
        assert http.get("/v2.01/acme/apikeys").status_code == 429
        assert http.post("/_emulator/rate", json={"limits": None}).status_code == 204
        assert http.get("/v2.01/acme/apikeys").status_code == 200
        # Shorter windows, for a test or a benchmark that must see one start again.
        assert http.post("/_emulator/rate", json={"limits": [3, 10, 100, 1000], "windows_s": [5, 60, 600, 6000]}
                         ).status_code == 204
        emulator.add_client("fresh", "Fresh")
        resets = http.get("/v2.01/fresh/apikeys").headers["X-RateLimit-Reset"].split(",")
        assert [int(r) - int(emulator.now()) for r in resets] == pytest.approx([5, 60, 600, 6000], abs=1)
        assert http.post("/_emulator/rate", json={"limits": None, "windows_s": None}).status_code == 204
        for wrong in ({"limits": [0, 1, 1, 1]}, {"limits": [3, 10]}, {"spend": {"acme": -5}}, {"spend": [1]},
                      {"spend": {"acme": 1.5}}, {"windows_s": [0, 1, 1, 1]}):
            assert http.post("/_emulator/rate", json=wrong).status_code == 400, wrong
        huge = http.post("/_emulator/rate", content=b'{"spend": {"acme": 1e999}}',
                         headers={"Content-Type": "application/json"})
        assert huge.status_code == 400
        assert http.get("/v2.01/acme/apikeys").headers.get("X-RateLimit") is None  # nothing applied part-way
    assert parse_rate_limits("off") is None and parse_rate_limits("10, 20,30,40") == (10, 20, 30, 40)
    refused = CliRunner().invoke(app, ["emulator", "--port", "0", "--rate-limits", "1,2,3,4,5"])
    assert refused.exit_code == 2 and "--rate-limits: rate limits: 4 counts" in refused.stderr
