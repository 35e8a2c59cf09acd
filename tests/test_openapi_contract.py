"""docs/keyservice-openapi.yaml is a valid OpenAPI 3.1 document, the emulator's real HTTP answers
conform to it, and so does every request the HTTP adapter sends.

The checking is openapi-core's (request: path, parameters, headers, security, body; response:
status, headers, body); the classes below only hand it httpx's requests and responses.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.validation.request.exceptions import (
    InvalidParameter,
    InvalidRequestBody,
    RequestValidationError,
    SecurityValidationError,
)
from openapi_core.validation.response.exceptions import InvalidData, MissingRequiredHeader
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.readers import read_from_filename
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from openapi_spec_validator.versions import OPENAPIV31, get_spec_version
from werkzeug.datastructures import Headers, ImmutableMultiDict

from rotator.domain import Replay, Scope, Secret
from rotator.errors import ForbiddenError
from rotator.keyservice.emulator import AUTO_ALIAS, REPLAY_TTL_S, Emulator, Fault
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "keyservice-openapi.yaml"
PROSE = ROOT / "docs" / "keyservice-api.md"
IDEM = "r2-0123456789abcdef0123456789abcdef"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


# --- httpx exchanges in openapi-core's Request and Response protocols -------------------------------

class ApiRequest:
    """An httpx request as openapi-core's `Request` protocol."""

    def __init__(self, request: httpx.Request) -> None:
        url = urlsplit(str(request.url))
        self.host_url = f"{url.scheme}://{url.netloc}"
        self.path = url.path
        self.method = request.method.lower()
        self.body: bytes | None = request.read() or None
        self.content_type = request.headers.get("Content-Type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qsl(url.query, keep_blank_values=True)),
            header=Headers(list(request.headers.multi_items())),
            cookie=ImmutableMultiDict(),
        )


class ApiResponse:
    """An httpx response as openapi-core's `Response` protocol."""

    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.headers = Headers(list(response.headers.multi_items()))
        self.content_type = response.headers.get("Content-Type", "")
        self.data: bytes | None = response.read()


class Contract:
    """Validates exchanges against the document and remembers which (operation, status) it saw."""

    def __init__(self, openapi: OpenAPI) -> None:
        self.openapi = openapi
        self.finder = APICallPathFinder(openapi.spec)
        self.seen: set[tuple[str, int]] = set()

    def operation(self, request: ApiRequest) -> str:
        found = self.finder.find(request.method, request.host_url + request.path)
        return str((found.operation / "operationId").read_str())

    def check(self, response: httpx.Response, *, outside: type[Exception] | None = None) -> httpx.Response:
        """The response conforms; the request conforms too, unless `outside` names how a request
        that deliberately breaks the contract is refused by the validator."""
        request = ApiRequest(response.request)
        if outside is None:
            self.openapi.validate_request(request)
        else:
            with pytest.raises(outside):
                self.openapi.validate_request(request)
        self.openapi.validate_response(request, ApiResponse(response))
        self.seen.add((self.operation(request), response.status_code))
        return response


def load_spec() -> dict[str, Any]:
    spec, _ = read_from_filename(str(SPEC))
    assert isinstance(spec, dict)
    return spec


def documented_operations() -> set[str]:
    spec = load_spec()
    return {op["operationId"] for item in spec["paths"].values() for m, op in item.items() if m in METHODS}


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC))


@pytest.fixture
def contract(openapi: OpenAPI) -> Contract:
    return Contract(openapi)


@pytest.fixture
def http(emulator: Emulator, emulator_server: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator_server.url,
                      headers={"Authorization": f"Bearer {emulator.token}"}) as client:
        yield client


def seed(emulator: Emulator, keys: int = 2, env: str = "PRODUCTION", client: str = "acme") -> list[str]:
    """A client with its auto-generated key first, then `keys` more; every key id, oldest first."""
    auto = [*emulator.add_client(client, "Acme", env, created_at=emulator.now() - 1000).keys]
    return auto + [emulator.add_key(client, f"k{i}", created_at=emulator.now() - 900 + i).id for i in range(keys)]


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


# --- (a) the document --------------------------------------------------------------------------------

def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1, and refuses it once broken."""
    spec = load_spec()
    assert get_spec_version(spec) == OPENAPIV31
    validate(spec, cls=OpenAPIV31SpecValidator)
    broken = copy.deepcopy(spec)  # a path parameter that the path does not declare
    del broken["paths"]["/v2.01/{ClientId}/apikeys/{KeyId}"]["parameters"][1]
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV31SpecValidator)


def test_document_covers_the_contract_and_nothing_private() -> None:
    """Every path is under /v2.01, none is an emulator control route, and the prose names each one
    and links the document."""
    spec = load_spec()
    prose = PROSE.read_text()
    assert "keyservice-openapi.yaml" in prose
    assert len(documented_operations()) == 9
    for path, item in spec["paths"].items():
        assert path.startswith("/v2.01/") and "_emulator" not in path
        for method in item.keys() & set(METHODS):
            assert f"`{method.upper()} {path}" in prose, f"{method.upper()} {path} not in keyservice-api.md"


# --- (b) the emulator's real answers -------------------------------------------------------------------

def test_emulator_conforms_on_every_operation(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """Every documented operation, driven once on its success path over real HTTP, conforms."""
    auto, key = seed(emulator, keys=1)
    sbx = seed(emulator, keys=0, env="SANDBOX", client="acme-sbx")[0]
    contract.check(http.get("/v2.01/clients"))
    contract.check(http.get("/v2.01/acme/apikeys"))
    contract.check(http.get(f"/v2.01/acme/apikeys/{auto}"))
    created = contract.check(http.post("/v2.01/acme/apikeys", headers={"Idempotency-Key": "create-0000000000000001"},
                                       json={"Alias": "payments", "Scopes": [{"Scope": "Payins", "Read": True}]}))
    contract.check(http.delete(f"/v2.01/acme/apikeys/{created.json()['Id']}"))
    reset = contract.check(http.post(f"/v2.01/acme/apikeys/{key}/reset", headers={"Idempotency-Key": IDEM}))
    contract.check(http.get(f"/v2.01/acme/responses/{IDEM}"))
    contract.check(http.get(f"/v2.01/acme-sbx/apikeys/{sbx}/secret"))
    contract.check(http.post("/v2.01/oauth/token", data={"grant_type": "client_credentials"},
                             headers=basic("acme", reset.json()["Secret"])))
    assert {op for op, _ in contract.seen} == documented_operations()
    assert all(status in (200, 204) for _, status in contract.seen)


def test_listings_paginate_as_documented(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """Pages with X-Number-Of-Pages/-Items, an empty page past the last, and bad paging refused."""
    seed(emulator, keys=24)
    seen: list[str] = []
    for page in (1, 2, 3):
        answer = contract.check(http.get("/v2.01/acme/apikeys", params={"page": page, "per_page": 10}))
        assert (answer.headers["X-Number-Of-Pages"], answer.headers["X-Number-Of-Items"]) == ("3", "25")
        seen += [row["Id"] for row in answer.json()]
    assert len(set(seen)) == 25
    past = contract.check(http.get("/v2.01/acme/apikeys", params={"page": 4, "per_page": 10}))
    assert past.json() == []
    clients = contract.check(http.get("/v2.01/clients", params={"per_page": 1}))
    assert clients.headers["X-Number-Of-Items"] == "1"
    for bad in ({"per_page": 101}, {"per_page": 0}, {"page": 0}):
        answer = contract.check(http.get("/v2.01/acme/apikeys", params=bad), outside=InvalidParameter)
        assert answer.status_code == 400
    assert ("listApiKeys", 400) in contract.seen


def test_not_found_forbidden_and_conflict(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """404 for an unknown Client ID or key, 403 for a production secret, 409 for revoking the
    auto-generated key or reusing an alias; a sandbox secret is readable."""
    auto, key = seed(emulator, keys=1)
    sbx_auto = seed(emulator, keys=0, env="SANDBOX", client="acme-sbx")[0]
    assert contract.check(http.get("/v2.01/nobody/apikeys")).status_code == 404
    assert contract.check(http.get("/v2.01/acme/apikeys/key_nope")).status_code == 404
    assert contract.check(http.delete("/v2.01/acme/apikeys/key_nope")).status_code == 404
    assert contract.check(http.get("/v2.01/acme/apikeys/key_nope/secret")).status_code == 404
    assert contract.check(http.get(f"/v2.01/acme/apikeys/{key}/secret")).status_code == 403
    secret = contract.check(http.get(f"/v2.01/acme-sbx/apikeys/{sbx_auto}/secret")).json()["Secret"]
    assert secret == emulator.current_secret("acme-sbx", sbx_auto)
    assert contract.check(http.delete(f"/v2.01/acme/apikeys/{auto}")).status_code == 409
    again = http.post("/v2.01/acme/apikeys", json={"Alias": AUTO_ALIAS, "Scopes": [{"Scope": "Users"}]})
    assert contract.check(again).status_code == 409
    assert contract.check(http.post("/v2.01/acme/apikeys/key_nope/reset")).status_code == 404
    missing = http.post("/v2.01/acme/apikeys", json={"Scopes": [{"Scope": "Users"}]})
    assert contract.check(missing, outside=InvalidRequestBody).status_code == 400
    assert {s for op, s in contract.seen if op == "readSandboxSecret"} == {200, 403, 404}


def test_every_operation_refuses_a_wrong_credential(
    emulator: Emulator, emulator_server: EmulatorServer, contract: Contract
) -> None:
    """A wrong management token (and, on oauth/token, a wrong secret or none) gets a conforming 401;
    a missing one is outside the contract and refused by the validator too."""
    auto, _ = seed(emulator, keys=1)
    values = {"ClientId": "acme", "KeyId": auto, "IdempotencyKey": IDEM}
    spec = load_spec()
    with httpx.Client(base_url=emulator_server.url) as http:
        for template, item in spec["paths"].items():
            path = template.format(**values)
            for method in item.keys() & set(METHODS):
                if path.endswith("/oauth/token"):
                    form = {"grant_type": "client_credentials"}
                    wrong = http.post(path, data=form, headers=basic("acme", "not-the-secret"))
                    assert contract.check(wrong).status_code == 401
                    none = http.post(path, data=form)
                    assert contract.check(none, outside=SecurityValidationError).status_code == 401
                    continue
                body = {"Alias": "new", "Scopes": [{"Scope": "Users"}]} if path.endswith("/apikeys") else None
                wrong = http.request(method.upper(), path, json=body, headers={"Authorization": "Bearer wrong-token"})
                assert contract.check(wrong).status_code == 401
                none = http.request(method.upper(), path, json=body)
                assert contract.check(none, outside=SecurityValidationError).status_code == 401
    assert {op for op, status in contract.seen if status == 401} == documented_operations()
    assert len(emulator.ledger) == 0


def test_oauth_token(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """A working secret gets a token; a reset secret a 401; another grant type a 400."""
    _, key = seed(emulator, keys=1)
    old = emulator.current_secret("acme", key)
    form = {"grant_type": "client_credentials"}
    token = contract.check(http.post("/v2.01/oauth/token", data=form, headers=basic("acme", old))).json()
    assert token["token_type"] == "bearer"
    contract.check(http.post(f"/v2.01/acme/apikeys/{key}/reset"))
    assert contract.check(http.post("/v2.01/oauth/token", data=form, headers=basic("acme", old))).status_code == 401
    other = http.post("/v2.01/oauth/token", data={"grant_type": "password"}, headers=basic("acme", old))
    assert contract.check(other, outside=InvalidRequestBody).status_code == 400


def test_idempotent_replay_and_stored_responses(
    emulator: Emulator, http: httpx.Client, contract: Contract
) -> None:
    """A repeated reset is blocked (409 idempotent_creation_conflict, on any path) and runs once; the
    stored answer (a 200 or a refusal) is the published API Response object, served by the responses
    endpoint for 24 hours; an unknown or expired key there is a 400 correlationid_not_found."""
    _, key, other = seed(emulator, keys=2)
    first = contract.check(http.post(f"/v2.01/acme/apikeys/{key}/reset", headers={"Idempotency-Key": IDEM}))
    again = contract.check(http.post(f"/v2.01/acme/apikeys/{key}/reset", headers={"Idempotency-Key": IDEM}))
    assert (again.status_code, again.json()["Type"]) == (409, "idempotent_creation_conflict")
    assert "Secret" not in again.text and len(emulator.ledger) == 1
    stored = contract.check(http.get(f"/v2.01/acme/responses/{IDEM}")).json()
    assert (stored["StatusCode"], stored["ContentLength"]) == ("200", str(len(first.content)))
    assert stored["Resource"] == first.json() and stored["Date"].endswith(" GMT")
    assert stored["RequestURL"] == f"https://api.keyservice.example/V2.01/acme/apikeys/{key}/reset"
    elsewhere = http.post(f"/v2.01/acme/apikeys/{other}/reset", headers={"Idempotency-Key": IDEM})
    assert contract.check(elsewhere).status_code == 409 and "Retry-After" not in elsewhere.headers
    assert elsewhere.json()["Type"] == "idempotent_creation_conflict" and len(emulator.ledger) == 1
    malformed = http.post(f"/v2.01/acme/apikeys/{key}/reset", headers={"Idempotency-Key": "short"})
    assert contract.check(malformed, outside=InvalidParameter).status_code == 400
    refused_key = "create-refused-000001"
    refused = http.post("/v2.01/acme/apikeys", headers={"Idempotency-Key": refused_key},
                        json={"Alias": "k0", "Scopes": [{"Scope": "Users"}]})
    assert contract.check(refused).status_code == 409
    stored = contract.check(http.get(f"/v2.01/acme/responses/{refused_key}")).json()
    assert stored["StatusCode"] == "409" and stored["Resource"]["Type"] == "conflict"
    never = contract.check(http.get("/v2.01/acme/responses/never-used-000000001"))
    assert (never.status_code, never.json()["Type"], never.json()["errors"]) == (400, "correlationid_not_found", None)
    emulator.clock_offset_s = REPLAY_TTL_S + 1
    assert contract.check(http.get(f"/v2.01/acme/responses/{IDEM}")).status_code == 400
    assert {s for op, s in contract.seen if op == "getStoredResponse"} == {200, 400}


def test_successor_keys(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """A create with Replaces makes a successor of the same alias (the listing shows Replaces and
    ReplacedBy, oldest first); 404 for an unknown predecessor, 409 for the auto-generated key and for a
    second successor, 400 for another alias; the stored create (with its Secret) is replayed."""
    auto, key = seed(emulator, keys=1)
    ik = "create-successor-0001"
    body = {"Alias": "k0", "Scopes": [{"Scope": "Users", "Read": True}], "Replaces": key}
    created = contract.check(http.post("/v2.01/acme/apikeys", headers={"Idempotency-Key": ik}, json=body))
    successor = created.json()
    assert created.status_code == 200 and (successor["Alias"], successor["Replaces"]) == ("k0", key)
    assert successor["ReplacedBy"] is None and successor["Secret"]
    again = contract.check(http.post("/v2.01/acme/apikeys", headers={"Idempotency-Key": ik}, json=body))
    assert again.status_code == 409 and len(emulator.keys_page("acme", 1, 100)[0]) == 3
    stored = contract.check(http.get(f"/v2.01/acme/responses/{ik}")).json()
    assert (stored["StatusCode"], stored["RequestURL"], stored["Resource"]) == (
        "200", "https://api.keyservice.example/V2.01/acme/apikeys", successor)
    listed = contract.check(http.get("/v2.01/acme/apikeys")).json()
    assert [(k["Id"], k["Replaces"], k["ReplacedBy"]) for k in listed] == [
        (auto, None, None), (key, None, successor["Id"]), (successor["Id"], key, None)]
    refusals = [({**body, "Replaces": "key_nope"}, 404), ({**body, "Alias": AUTO_ALIAS, "Replaces": auto}, 409),
                (body, 409), ({**body, "Alias": "other"}, 400)]
    for n, (refused_body, status) in enumerate(refusals):
        answer = http.post("/v2.01/acme/apikeys", headers={"Idempotency-Key": f"create-refused-{n:06d}"},
                           json=refused_body)
        assert contract.check(answer).status_code == status
    assert "reset" in http.post("/v2.01/acme/apikeys", json={**body, "Alias": AUTO_ALIAS, "Replaces": auto}
                                ).json()["Message"]
    assert http.post("/v2.01/acme/apikeys", json={**body, "Alias": "other"}).json()["errors"] == {
        "Alias": "must be the alias of the replaced key"}
    typeless = http.post("/v2.01/acme/apikeys", json={**body, "Replaces": 7})
    assert contract.check(typeless, outside=InvalidRequestBody).json()["errors"] == {"Replaces": "must be a key id"}
    contract.check(http.delete(f"/v2.01/acme/apikeys/{key}"))
    after = contract.check(http.get(f"/v2.01/acme/apikeys/{successor['Id']}")).json()
    assert (after["Alias"], after["Replaces"], after["ReplacedBy"]) == ("k0", None, None)
    assert {s for op, s in contract.seen if op == "createApiKey"} == {200, 400, 404, 409}


def test_throttling_and_server_errors(emulator: Emulator, http: httpx.Client, contract: Contract) -> None:
    """429 with Retry-After, 503 with and 500 without it: each a conforming error answer."""
    _, key = seed(emulator, keys=1)
    emulator.add_fault(Fault(method="GET", path="/apikeys$", status=429, retry_after=2))
    throttled = contract.check(http.get("/v2.01/acme/apikeys"))
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "2")
    emulator.add_fault(Fault(method="POST", path="/reset$", status=503, retry_after=1))
    assert contract.check(http.post(f"/v2.01/acme/apikeys/{key}/reset")).status_code == 503
    emulator.add_fault(Fault(method="GET", path="/clients$", status=500))
    assert contract.check(http.get("/v2.01/clients")).status_code == 500


def test_the_checks_catch_a_nonconforming_answer(
    emulator: Emulator, http: httpx.Client, contract: Contract
) -> None:
    """The same validation refuses answers that break the document: a key with its secret where
    none belongs, a listing without its page count, a 429 without Retry-After, successor links
    that are no ids or missing, an error Type that does not match its status."""
    auto, key = seed(emulator, keys=1)
    leaked = {**emulator.get_key("acme", key), "Secret": "prod_x"}
    emulator.add_fault(Fault(method="GET", path=f"/apikeys/{key}$", body=json.dumps(leaked)))
    with pytest.raises(InvalidData):
        contract.check(http.get(f"/v2.01/acme/apikeys/{key}"))
    listing = http.get("/v2.01/acme/apikeys")
    del listing.headers["X-Number-Of-Pages"]
    with pytest.raises(MissingRequiredHeader):
        contract.check(listing)
    emulator.add_fault(Fault(method="GET", path="/clients$", status=429))
    with pytest.raises(MissingRequiredHeader):
        contract.check(http.get("/v2.01/clients"))
    plain = emulator.get_key("acme", key)  # successor links that are no ids, or missing
    unlinked = {k: v for k, v in plain.items() if k != "ReplacedBy"}
    for lie in ({**plain, "Replaces": "../x"}, {**plain, "ReplacedBy": 7}, unlinked):
        emulator.add_fault(Fault(method="GET", path=f"/apikeys/{key}$", body=json.dumps(lie)))
        with pytest.raises(InvalidData):
            contract.check(http.get(f"/v2.01/acme/apikeys/{key}"))
    emulator.add_fault(Fault(method="DELETE", path=f"/apikeys/{auto}$", status=409))
    mislabelled = http.delete(f"/v2.01/acme/apikeys/{auto}")
    body = {**mislabelled.json(), "Type": "ressource_not_found"}
    with pytest.raises(InvalidData):
        contract.check(httpx.Response(409, json=body, request=mislabelled.request))


# --- (c) the HTTP adapter's requests --------------------------------------------------------------------

class Recording(httpx.BaseTransport):
    """A real transport that keeps every exchange (the answer read whole, then handed on)."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.exchanges: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        response.read()
        response.request = request
        self.exchanges.append(response)
        return response

    def close(self) -> None:
        self._inner.close()


def test_adapter_requests_conform(emulator: Emulator, emulator_server: EmulatorServer, contract: Contract) -> None:
    """Every request HttpKeyService sends for every operation (pages, retries, refusals included)
    is a valid request of the document, and every answer it got conforms."""
    auto, key, *_ = seed(emulator, keys=4)
    sbx = seed(emulator, keys=0, env="SANDBOX", client="acme-sbx")[0]
    recording = Recording()
    with HttpKeyService(emulator_server.url, emulator.token, timeout_s=2, max_attempts=4, retry_initial_s=0.01,
                        retry_max_wait_s=0.2, clock_skew_s=3 * 86_400, transport=recording) as ks:
        emulator.add_fault(Fault(method="GET", path="/clients$", status=429, retry_after=0))
        assert {c.client_id for c in ks.list_clients()} == {"acme", "acme-sbx"}
        ks.per_page = 2
        assert len(list(ks.list_keys("acme"))) == 5
        assert ks.get_key("acme", auto).alias == AUTO_ALIAS
        emulator.add_fault(Fault(method="POST", path="/reset$", status=503))
        issued = ks.reset_key("acme", key, IDEM)
        assert ks.reset_key("acme", key, IDEM).secret == issued.secret  # a 409, then the stored answer
        assert ks.replay("acme", key, IDEM).kind is Replay.ANSWER
        assert ks.replay("acme", key, "never-used-000000001").kind is Replay.EMPTY
        created = ks.create_key("acme", "payments", (Scope("Payins", True, False),), "create-0000000000000001")
        successor = ks.create_key("acme", "payments", created.key.scopes, "create-0000000000000002",
                                  replaces=created.key.key_id)
        assert ks.replay_create("acme", created.key.key_id, "create-0000000000000002").kind is Replay.ANSWER
        ks.revoke_key("acme", created.key.key_id)
        ks.revoke_key("acme", successor.key.key_id)
        assert ks.read_sandbox_secret("acme-sbx", sbx).reveal() == emulator.current_secret("acme-sbx", sbx)
        with pytest.raises(ForbiddenError):
            ks.read_sandbox_secret("acme", key)
        assert ks.verify_secret("acme", issued.secret)
        assert not ks.verify_secret("acme", Secret("not-the-secret"))
    assert len(recording.exchanges) >= 16
    for response in recording.exchanges:
        try:
            contract.check(response)
        except RequestValidationError as exc:
            raise AssertionError(f"the adapter sent {response.request.method} {response.request.url}: {exc!r}") from exc
    assert {op for op, _ in contract.seen} == documented_operations()
    assert {("listClients", 429), ("resetApiKey", 503), ("resetApiKey", 409), ("getStoredResponse", 400),
            ("readSandboxSecret", 403), ("getToken", 401)} <= contract.seen
