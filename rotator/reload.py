"""Reload hooks: once every sink holds a key's new secret, tell its consumers to read it again.

A reset kills the old secret at once (the Auto-generated key can only be reset), so the consumers
fail until they re-read the sink; a hook shortens that to the time the hook takes. Two kinds:

- `HttpReload`: a POST to an application's reload endpoint, signed as the webhooks are (Standard
  Webhooks, `rotator.alerts.webhook`), event `secret.stored`, naming the key, never its secret;
- `KubernetesRollout`: `kubectl rollout restart` of named Deployments through the Kubernetes API
  (a strategic-merge PATCH of the pod template's `kubectl.kubernetes.io/restartedAt` annotation,
  which needs `get` and `patch` on those Deployments only: deploy/kubernetes/reload/rbac.yaml).

A hook runs after the rotation is settled: its failure is the event `reload.failed`, never a
rotation that failed or a secret at risk.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx

from rotator.alerts.webhook import post_signed
from rotator.config import ReloadConfig
from rotator.errors import PermanentError, RotatorError, TransientError

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
RBAC = "deploy/kubernetes/reload/rbac.yaml"


class ReloadHook(Protocol):
    def describe(self) -> str: ...

    def wants(self, told: dict[str, Any]) -> bool: ...

    def run(self, told: dict[str, Any]) -> None:
        """Tell; RotatorError (TransientError: worth another try) when it was not done."""
        ...


class Selected:
    """Which keys a hook is for: its Client IDs and base aliases (None: every one); how often it is tried."""

    tries = 3

    def __init__(self, clients: Iterable[str] | None, aliases: Iterable[str] | None) -> None:
        self.clients = None if clients is None else frozenset(clients)
        self.aliases = None if aliases is None else frozenset(aliases)

    def wants(self, told: dict[str, Any]) -> bool:
        return (self.clients is None or told.get("client_id") in self.clients) and \
            (self.aliases is None or told.get("base_alias") in self.aliases)


class HttpReload(Selected):
    def __init__(self, url: str, secret: str, timeout_s: float, clients: Iterable[str] | None = None,
                 aliases: Iterable[str] | None = None) -> None:
        super().__init__(clients, aliases)
        self.url, self._secret, self.timeout_s = url, secret, timeout_s

    def describe(self) -> str:
        """Scheme, host and port only: a path may hold a token (results, the history and the page
        show this); two hooks on one host are told apart by their order (`run_all`)."""
        url = httpx.URL(self.url)
        port = f":{url.port}" if url.port else ""
        return f"reload {url.scheme}://{url.host}{port}" + ("/…" if url.path not in ("", "/") else "")

    def run(self, told: dict[str, Any]) -> None:
        body = json.dumps({"event": "secret.stored", **told}, sort_keys=True, separators=(",", ":")).encode()
        post_signed(self.url, self._secret, body, "secret.stored", self.timeout_s, self.describe())


class KubernetesRollout(Selected):
    def __init__(self, namespace: str, deployments: list[str], api_url: str, token_file: Path,
                 ca_file: Path | None, timeout_s: float, clients: Iterable[str] | None = None,
                 aliases: Iterable[str] | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clients, aliases)
        self.namespace, self.deployments, self.api_url = namespace, deployments, api_url.rstrip("/")
        self.token_file, self.ca_file, self.timeout_s, self.clock = token_file, ca_file, timeout_s, clock
        self._restarted: dict[str, set[str]] = {}  # per rotation told: the Deployments already restarted

    def describe(self) -> str:
        return f"rollout {self.namespace}/{','.join(self.deployments)}"

    def patch(self) -> dict[str, Any]:
        """The strategic-merge patch `kubectl rollout restart` sends; to the microsecond, so that two
        keys stored within one second restart the pods twice, the second time with both secrets."""
        now = self.clock()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
        return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}

    def run(self, told: dict[str, Any]) -> None:
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise PermanentError(f"{self.describe()}: cannot read the service account token "
                                 f"{self.token_file} ({exc.strerror})") from None
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None and self.api_url.startswith("https://"):
            try:
                verify = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise PermanentError(f"{self.describe()}: cannot read the API server's CA bundle {self.ca_file} "
                                     f"({type(exc).__name__})") from None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/strategic-merge-patch+json",
                   "Accept": "application/json", "User-Agent": "rotator"}
        if len(self._restarted) > 256:  # rotations whose tries ran out: forgotten
            self._restarted.clear()
        done = self._restarted.setdefault(str(told.get("attempt_id")), set())  # a try again skips these
        failed: list[RotatorError] = []
        with httpx.Client(base_url=self.api_url, headers=headers, verify=verify, timeout=self.timeout_s) as client:
            for name in self.deployments:  # one that is gone or paused holds back none of the others
                if name in done:
                    continue
                try:
                    self._restart(client, name)
                    done.add(name)
                except RotatorError as exc:
                    failed.append(exc)
        if not failed:
            self._restarted.pop(str(told.get("attempt_id")), None)
            return
        why = "; ".join(str(exc) for exc in failed)
        if any(isinstance(exc, TransientError) for exc in failed):
            raise TransientError(why)
        self._restarted.pop(str(told.get("attempt_id")), None)
        raise PermanentError(why)

    def _restart(self, client: httpx.Client, name: str) -> None:
        """As `kubectl rollout restart`: a paused Deployment is refused (its pods would not restart)."""
        where = f"{self.describe()}: deployment {self.namespace}/{name}"
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}"
        found = self._call(client, "GET", path, where)
        try:
            paused = bool(found.json().get("spec", {}).get("paused"))
        except (ValueError, AttributeError):
            raise PermanentError(f"{where}: the API server's answer is not a Deployment") from None
        if paused:
            raise PermanentError(f"{where}: paused; run `kubectl rollout resume` first")
        self._call(client, "PATCH", path, where, json.dumps(self.patch()).encode())

    def _call(self, client: httpx.Client, method: str, path: str, where: str, body: bytes | None = None
              ) -> httpx.Response:
        try:
            answer = client.request(method, path, content=body)
        except httpx.TimeoutException:
            raise TransientError(f"{where}: no answer within {self.timeout_s:g}s") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None
        if answer.status_code in (401, 403):
            raise PermanentError(f"{where}: {answer.status_code}; the worker's service account needs get and patch "
                                 f"on it ({RBAC})")
        if answer.status_code == 404:
            raise PermanentError(f"{where}: not found")
        if answer.status_code in (408, 409, 429) or answer.status_code >= 500:
            raise TransientError(f"{where}: {answer.status_code}")
        if not 200 <= answer.status_code < 300:
            raise PermanentError(f"{where}: {answer.status_code}")
        return answer


def build(configs: Iterable[ReloadConfig], environ: dict[str, str] | None = None) -> list[ReloadHook]:
    """The hooks of `[[reload]]`; a hook's credentials are read here, once, at start."""
    env = os.environ if environ is None else environ
    hooks: list[ReloadHook] = []
    for config in configs:
        hook: HttpReload | KubernetesRollout
        if config.kind == "http":
            hook = HttpReload(str(config.url), config.signing_secret(), config.timeout_s, config.clients,
                              config.aliases)
        else:
            api = config.api_url or (f"https://{env.get('KUBERNETES_SERVICE_HOST', 'kubernetes.default.svc')}:"
                                     f"{env.get('KUBERNETES_SERVICE_PORT', '443')}")
            hook = KubernetesRollout(str(config.namespace), list(config.deployments), api, config.token_file,
                                     config.ca_file, config.timeout_s, config.clients, config.aliases)
        hook.tries = config.tries
        hooks.append(hook)
    return hooks


def run_all(hooks: Iterable[ReloadHook], told: dict[str, Any],
            sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Each hook that wants the key `told` names, tried up to its `tries` times (1 s, then doubling) while it
    fails transiently: its description -> "ok" or "failed: why"."""
    outcomes: dict[str, str] = {}
    for hook in hooks:
        if not hook.wants(told):
            continue
        name = hook.describe()
        if name in outcomes:  # two hooks that show alike (URLs that differ in their query) stay apart
            name = f"{name} #{sum(n.startswith(name) for n in outcomes) + 1}"
        wait, tries = 1.0, int(getattr(hook, "tries", 3))
        for attempt in range(1, tries + 1):
            try:
                hook.run(told)
                outcomes[name] = "ok"
                break
            except TransientError as exc:
                outcomes[name] = f"failed: {exc}"
                if attempt < tries:
                    sleep(wait)
                    wait *= 2
            except RotatorError as exc:
                outcomes[name] = f"failed: {exc}"
                break
            except Exception as exc:  # a hook's own fault must not undo a stored rotation's outcome
                outcomes[name] = f"failed: {type(exc).__name__}"
                break
    return outcomes
