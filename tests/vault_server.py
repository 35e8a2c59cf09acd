"""A KV v2 test server that follows Vault's documented HTTP API, for hvac over real HTTP.

What it implements (from Vault's API docs): the response envelope; `{"errors": [...]}` bodies;
`X-Vault-Token` checks (403 "permission denied"); a sealed state (503 "Vault is sealed"); KV v2
`data/` reads and writes with `options.cas` and its exact CAS error; `metadata/` reads and writes
(`max_versions` pruning, `custom_metadata`, `delete_version_after`, `cas_required`); AppRole and
Kubernetes logins; `auth/token/lookup-self`; `sys/health`. Enough for the sink contract, no more.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CAS_MISMATCH = "check-and-set parameter did not match the current version"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class VaultState:
    def __init__(self, root_token: str, mount: str = "secret") -> None:
        self.lock = threading.RLock()
        self.mount = mount
        # token -> "write" | "read"
        self.tokens: dict[str, str] = {root_token: "write"}
        self.token_ttl_s: float | None = None  # login tokens expire after this (None: never)
        self.expires: dict[str, float] = {}
        self.approles: dict[str, str] = {}  # role_id -> secret_id
        self.k8s_roles: dict[str, str] = {}  # role -> expected jwt
        self.sealed = False
        self.secrets: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.hold_writes = threading.Event()  # cleared: writes wait (to catch a crash mid-rotation)
        self.hold_writes.set()
        self.fail_data_writes = 0  # the next N secret writes answer 503 (reads and logins still work)
        self.latency_s = 0.0  # added to every request (benchmarks: a network round trip)

    def issue_token(self, policy: str = "write") -> str:
        token = "hvs." + secrets.token_urlsafe(18)
        self.tokens[token] = policy
        if self.token_ttl_s is not None:
            self.expires[token] = time.monotonic() + self.token_ttl_s
        return token

    def policy_of(self, token: str) -> str | None:
        """The token's policy; None for an unknown or expired token (Vault answers 403 to both)."""
        if token in self.expires and time.monotonic() >= self.expires[token]:
            return None
        return self.tokens.get(token)


class VaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: VaultTestServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_LIST(self) -> None:
        self._handle("LIST")

    def _handle(self, method: str) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        url = urlsplit(self.path)
        path = url.path.removeprefix("/v1/")
        state.requests.append((method, path))
        if state.latency_s:
            time.sleep(state.latency_s)
        if path == "sys/health":
            return self._send(503 if state.sealed else 200, {"initialized": True, "sealed": state.sealed,
                                                            "standby": False, "version": "1.17.0-test"}, raw=True)
        if state.sealed:
            return self._errors(503, ["Vault is sealed"])
        if path == "auth/approle/login" and method == "POST":
            if state.approles.get(body.get("role_id", "")) != body.get("secret_id") or not body.get("secret_id"):
                return self._errors(400, ["invalid role or secret ID"])
            return self._login(state.issue_token())
        if path == "auth/kubernetes/login" and method == "POST":
            if state.k8s_roles.get(body.get("role", "")) != body.get("jwt"):
                return self._errors(403, ["permission denied"])
            return self._login(state.issue_token())
        policy = state.policy_of(self.headers.get("X-Vault-Token", ""))
        if policy is None:
            return self._errors(403, ["permission denied"])
        if path == "auth/token/lookup-self":
            return self._send(200, {"policies": [policy], "ttl": 0})
        if path == "sys/capabilities-self" and method == "POST":
            caps = ["create", "read", "update", "delete", "list"] if policy == "write" else ["read", "list"]
            return self._send(200, {**{p: caps for p in body.get("paths", [])}, "capabilities": caps}, raw=True)
        prefix, _, rest = path.partition("/")
        kind, _, secret_path = rest.partition("/")
        listing = method == "LIST" or (method == "GET" and parse_qs(url.query).get("list") == ["true"])
        if prefix == state.mount and kind == "metadata" and listing:
            with state.lock:
                return self._list(secret_path.strip("/"))
        if prefix != state.mount or kind not in ("data", "metadata") or not secret_path:
            return self._errors(404, [f"no handler for route \"{path}\". route entry not found."])
        if method != "GET" and policy != "write":
            return self._errors(403, ["1 error occurred:\n\t* permission denied\n\n"])
        with state.lock:
            if kind == "data" and method == "GET":
                return self._read_data(secret_path, parse_qs(url.query))
            if kind == "data" and method == "POST":
                state.hold_writes.wait(60)
                if state.fail_data_writes:
                    state.fail_data_writes -= 1
                    return self._errors(503, ["injected: storage backend unavailable"])
                return self._write_data(secret_path, body)
            if kind == "metadata" and method == "GET":
                return self._read_metadata(secret_path)
            if kind == "metadata" and method == "POST":
                return self._write_metadata(secret_path, body)
        return self._errors(405, ["unsupported operation"])

    # --- KV v2 -----------------------------------------------------------------------------
    def _list(self, folder: str) -> None:
        """Vault's LIST on metadata/<folder>: the names right below it, folders with a trailing
        slash; 404 when nothing is stored below it."""
        below = f"{folder}/" if folder else ""
        names = set()
        for path, entry in self.server.state.secrets.items():
            if path.startswith(below) and entry["current_version"]:
                head, sep, _ = path[len(below):].partition("/")
                names.add(head + sep)
        if not names:
            return self._errors(404, [])
        return self._send(200, {"keys": sorted(names)})

    def _entry(self, path: str) -> dict[str, Any]:
        return self.server.state.secrets.setdefault(path, {
            "versions": {}, "current_version": 0, "oldest_version": 0, "max_versions": 0,
            "cas_required": False, "delete_version_after": "0s", "custom_metadata": None,
            "created_time": _now(), "updated_time": _now()})

    def _read_data(self, path: str, query: dict[str, list[str]]) -> None:
        entry = self.server.state.secrets.get(path)
        if not entry or not entry["current_version"]:
            return self._errors(404, [])
        version = int(query.get("version", ["0"])[0]) or entry["current_version"]
        stored = entry["versions"].get(version)
        if stored is None:
            return self._errors(404, [])
        metadata = {**stored["meta"], "version": version, "custom_metadata": entry["custom_metadata"]}
        return self._send(200, {"data": stored["data"], "metadata": metadata})

    def _write_data(self, path: str, body: dict[str, Any]) -> None:
        entry = self._entry(path)
        cas = (body.get("options") or {}).get("cas")
        if entry["cas_required"] and cas is None:
            return self._errors(400, ["check-and-set parameter required for this call"])
        if cas is not None and int(cas) != entry["current_version"]:
            return self._errors(400, [CAS_MISMATCH])
        if not isinstance(body.get("data"), dict):
            return self._errors(400, ["no data provided"])
        version = entry["current_version"] + 1
        meta = {"created_time": _now(), "deletion_time": "", "destroyed": False}
        entry["versions"][version] = {"data": body["data"], "meta": meta}
        entry["current_version"] = version
        entry["updated_time"] = meta["created_time"]
        self._prune(entry)
        return self._send(200, {**meta, "version": version, "custom_metadata": entry["custom_metadata"]})

    def _prune(self, entry: dict[str, Any]) -> None:
        keep = entry["max_versions"] or 10
        for version in sorted(entry["versions"])[:-keep]:
            del entry["versions"][version]
        entry["oldest_version"] = min(entry["versions"]) if entry["versions"] else 0

    def _read_metadata(self, path: str) -> None:
        entry = self.server.state.secrets.get(path)
        if entry is None:
            return self._errors(404, [])
        versions = {str(v): {**s["meta"]} for v, s in entry["versions"].items()}
        return self._send(200, {k: entry[k] for k in (
            "cas_required", "created_time", "current_version", "custom_metadata",
            "delete_version_after", "max_versions", "oldest_version", "updated_time")} | {"versions": versions})

    def _write_metadata(self, path: str, body: dict[str, Any]) -> None:
        entry = self._entry(path)
        custom = body.get("custom_metadata")
        if custom is not None:
            if not all(isinstance(v, str) for v in custom.values()):
                return self._errors(400, ["custom_metadata values must be strings"])
            entry["custom_metadata"] = custom  # replaces the whole map, as Vault does
        if "max_versions" in body:
            entry["max_versions"] = int(body["max_versions"])
            self._prune(entry)
        if "cas_required" in body:
            entry["cas_required"] = bool(body["cas_required"])
        if "delete_version_after" in body:
            entry["delete_version_after"] = body["delete_version_after"]
        entry["updated_time"] = _now()
        self._reply(204, b"")

    # --- plumbing ----------------------------------------------------------------------------
    def _login(self, token: str) -> None:
        ttl = self.server.state.token_ttl_s
        self._send(200, None, auth={"client_token": token, "policies": ["default"],
                                    "lease_duration": int(ttl) if ttl is not None else 3600,
                                    "renewable": True, "accessor": secrets.token_hex(8)})

    def _errors(self, status: int, errors: list[str]) -> None:
        self._reply(status, json.dumps({"errors": errors}).encode())

    def _send(self, status: int, data: Any, *, auth: Any = None, raw: bool = False) -> None:
        payload = data if raw else {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
                                    "lease_duration": 0, "data": data, "wrap_info": None, "warnings": None,
                                    "auth": auth}
        self._reply(status, json.dumps(payload).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class VaultTestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root_token: str = "root-token") -> None:
        super().__init__(("127.0.0.1", 0), VaultHandler)
        self.state = VaultState(root_token)
        self.root_token = root_token
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that died mid-request (a killed worker) is expected here, not an error."""

    def __enter__(self) -> VaultTestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.hold_writes.set()
        self.shutdown()
        self.server_close()
