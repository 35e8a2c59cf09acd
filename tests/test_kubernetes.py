"""deploy/kubernetes: every manifest validates offline against the Kubernetes schemas that
kubernetes-validate ships, and the invariants a platform team checks hold: one beat with Recreate,
probes from `rotator health`, a grace period longer than the longest rotation, no credential in a
ConfigMap or a literal env value, non-root, read-only root filesystem, no capability, seccomp, and
resources."""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rotator.config import Settings, longest_rotation_s, settings_from_mapping

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
#: Kubernetes releases to validate against: a widely run one and the newest the library ships.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "StatefulSet")
CREDENTIAL_NAME = re.compile(r"token|password|secret|passwd|credential|api_?key|private", re.I)


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def named(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] in WORKLOADS]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def rotator_config(name: str = "rotator-config") -> dict[str, Any]:
    return tomllib.loads(named("ConfigMap", name)["data"]["rotator.toml"])


def config_map_of(workload: dict[str, Any]) -> str:
    """The name of the ConfigMap holding the workload's rotator.toml."""
    [name] = [v["configMap"]["name"] for v in workload["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    return str(name)


def credential_files(config: dict[str, Any]) -> list[str]:
    """Every `*_file` path a configuration names."""
    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and key.endswith("_file"):
                    files.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config)
    return files


def mounted_files(workload: dict[str, Any]) -> list[str]:
    """Paths a container of the workload can read from a Secret or projected volume: one per item
    when the volume names its items, else a whole directory (ending in `/`)."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"] if "secret" in v or "projected" in v}
    found = []
    for container in containers(workload):
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is None:
                continue
            root = mount["mountPath"].rstrip("/")
            items = volume["secret"].get("items") if "secret" in volume else [
                {"path": source[kind]["path"]} for source in volume["projected"]["sources"] for kind in source]
            found += [f"{root}/{item['path']}" for item in items] if items else [f"{root}/"]
    return found


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (`512Mi`, `1Gi`, `500M`) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, size in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * size)
    return int(text)


def redis_memory(text: str) -> int:
    """A redis.conf memory value (`320mb`, `1gb`, `100m`) in bytes, as Redis reads it."""
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 10**3, "m": 10**6, "g": 10**9}
    lowered = text.lower()
    for unit, size in units.items():
        if lowered.endswith(unit):
            return int(lowered[:-len(unit)]) * size
    return int(lowered)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No connection can be opened: the schemas must come from the installed package."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_offline(version: str, offline: None) -> None:
    """Each document of each manifest passes kubernetes-validate in strict mode (unknown fields
    are errors), except the ServiceMonitor, whose CRD schema is not Kubernetes's own."""
    checked = 0
    for path, doc in manifests():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
        checked += 1
    assert checked >= 12


def test_a_broken_manifest_is_refused(offline: None) -> None:
    """The validation is real: a misspelt field and a wrong type are reported."""
    beat = named("Deployment", "rotator-beat")
    typo = yaml.safe_load(yaml.safe_dump(beat))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[0], strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(beat))
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[0], strict=True)


def test_service_monitor_selects_the_metrics_service() -> None:
    """The one CRD document, checked by hand: it selects the metrics Service by its labels and
    scrapes a port that Service names."""
    monitor = named("ServiceMonitor", "rotator")
    service = named("Service", "rotator-metrics")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_each_kustomization_lists_exactly_its_files() -> None:
    """Every kustomization names files that exist, and every manifest beside it is named."""
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        assert data["kind"] == "Kustomization" and data["namespace"] == "rotator"
        listed = set(data["resources"])
        present = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, kustomization


def test_two_beats_on_two_nodes_one_always_there() -> None:
    """Beat: two replicas (rotator.beat lets one schedule), spread over nodes, a rollout and a drain
    that never stop both, not scaled by the kustomization, a private writable state dir."""
    beats = [w for w in workloads() if w["metadata"]["labels"].get("app.kubernetes.io/component") == "beat"]
    assert [b["metadata"]["name"] for b in beats] == ["rotator-beat"]
    beat = beats[0]
    assert beat["spec"]["replicas"] == 2
    assert beat["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    [spread] = beat["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spread["podAffinityTerm"]["labelSelector"]["matchLabels"] == beat["spec"]["selector"]["matchLabels"]
    budget = named("PodDisruptionBudget", "rotator-beat")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": beat["spec"]["selector"]}
    scaled = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text()).get("replicas", [])
    assert "rotator-beat" not in {r["name"] for r in scaled}
    [container] = containers(beat)
    assert container["args"][0] == "beat"
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in beat["spec"]["template"]["spec"]["volumes"]}
    [state] = [m for m in container["volumeMounts"] if m["mountPath"] == env["XDG_STATE_HOME"]]
    assert "emptyDir" in volumes[state["name"]] and not state.get("readOnly")


def test_workers_outlast_their_longest_rotation_and_have_a_budget() -> None:
    """terminationGracePeriodSeconds is longer than the longest rotation of the shipped config
    (Celery's warm shutdown lets it finish); the broker's redelivery timeout is longer still; a
    PodDisruptionBudget covers the workers."""
    worker = named("Deployment", "rotator-worker")
    data = rotator_config()
    longest = longest_rotation_s(Settings(**data))  # the bound needs no credential
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > longest, f"grace {grace}s, longest rotation {longest:.0f}s"
    assert data["celery"]["visibility_timeout_s"] > grace
    pdb = named("PodDisruptionBudget", "rotator-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_probes_are_rotator_health() -> None:
    """Workers: liveness and startup ping this pod's Celery worker (`rotator health --worker`),
    readiness checks Redis and the broker; beat uses `rotator health`. Every container has both."""
    for workload in workloads():
        for container in containers(workload):
            assert "livenessProbe" in container and "readinessProbe" in container, workload["metadata"]["name"]
    [worker] = containers(named("Deployment", "rotator-worker"))
    assert worker["livenessProbe"]["exec"]["command"] == ["rotator", "health", "--worker"]
    assert worker["startupProbe"]["exec"]["command"] == ["rotator", "health", "--worker"]
    assert worker["readinessProbe"]["exec"]["command"] == ["rotator", "health"]
    [beat] = containers(named("Deployment", "rotator-beat"))
    assert beat["livenessProbe"]["exec"]["command"] == beat["readinessProbe"]["exec"]["command"] == [
        "rotator", "health"]
    from rotator.cli import app

    assert "health" in {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}


def test_pods_are_locked_down() -> None:
    """Every pod: non-root (a numeric user), seccomp RuntimeDefault, no service-account API token;
    every container: read-only root filesystem, no privilege escalation, every capability dropped,
    requests and limits, a pinned image."""
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(workload):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}, name
            assert context.get("privileged", False) is False, name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], name
            assert not container["image"].endswith(":latest"), name
    namespace = named("Namespace", "rotator")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_image_runs_as_the_manifests_user() -> None:
    """The Dockerfile: a slim Python base and the same numeric non-root user the pods run as."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim\b", dockerfile, re.M)
    [user] = re.findall(r"^USER (\S+)", dockerfile, re.M)
    uid = int(user.split(":")[0])
    assert uid > 0
    rotator_pods = [w for w in workloads() if w["metadata"]["labels"]["app.kubernetes.io/name"] == "rotator"]
    assert {w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for w in rotator_pods} == {uid}


def _validated(data: dict[str, Any]) -> Any:
    return settings_from_mapping(data, source="configmap", environ={})


def test_config_has_no_credential_and_every_file_is_a_mounted_secret(tmp_path: Path) -> None:
    """The ConfigMap's rotator.toml is a valid configuration whose credentials are all `*_file`
    paths; each path lies in a Secret (or the projected Vault token) mounted in every rotator pod;
    no ConfigMap value and no literal env value looks like a credential."""
    def no_value(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and CREDENTIAL_NAME.search(key) and not key.endswith(("_env", "_file")):
                    pytest.fail(f"{key} holds a value in the ConfigMap")
                no_value(value)
        elif isinstance(node, list):
            for item in node:
                no_value(item)

    names = [d["metadata"]["name"] for _, d in manifests() if d["kind"] == "ConfigMap" and "rotator.toml" in d["data"]]
    assert sorted(names) == ["rotator-config", "rotator-metrics-config", "rotator-web-config"]
    for name in names:
        data = rotator_config(name)
        no_value(data)
        files = credential_files(data)
        assert len(files) >= (4 if name == "rotator-config" else 1), name
        # Valid as it stands once each named file exists (check-config's own checks).
        text = named("ConfigMap", name)["data"]["rotator.toml"]
        signing_key = (data.get("signing") or {}).get("private_key_file")
        for index, path in enumerate(sorted(set(files))):
            stand_in = tmp_path / f"{name}-credential-{index}"
            if path == signing_key:  # check-config reads it as every signer would: a real key, 0600
                from rotator.signing import write_private_key

                write_private_key(stand_in)
            else:
                stand_in.write_text("x" * 32)
            text = text.replace(f'"{path}"', f'"{stand_in}"')
        _validated(tomllib.loads(text))
    for workload in workloads():
        if workload["metadata"]["labels"]["app.kubernetes.io/name"] != "rotator":
            continue
        mounted = mounted_files(workload)
        for path in credential_files(rotator_config(config_map_of(workload))):
            assert any(path == m or (m.endswith("/") and path.startswith(m)) for m in mounted), (
                workload["metadata"]["name"], path)
    for _, doc in manifests():
        if doc["kind"] == "ConfigMap":
            for value in doc["data"].values():
                assert "BEGIN" not in value and not re.search(r"(?i)(password|token|secret)\s*=\s*\"", value)
        if doc["kind"] == "Secret":
            pytest.fail("a Secret with values is shipped; docs/kubernetes.md creates it")
        if doc["kind"] in WORKLOADS:
            for container in containers(doc):
                for env in container.get("env", []):
                    if CREDENTIAL_NAME.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, env["name"]


def test_no_service_links() -> None:
    """No pod gets the `<SERVICE>_PORT=tcp://…` variables of every Service in the namespace (a
    Service named rotator-web would put ROTATOR_WEB_PORT into each rotator pod)."""
    for workload in workloads():
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False, workload["metadata"]["name"]


def test_the_example_redis_refuses_writes_before_its_limit() -> None:
    """`maxmemory` with `noeviction`, below the container's memory limit with room to spare (the
    append-only file's rewrite forks): a full Redis refuses writes instead of being OOM-killed."""
    conf = named("ConfigMap", "redis-config")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#"))
    assert settings["maxmemory-policy"] == "noeviction"
    [redis] = containers(named("StatefulSet", "redis"))
    limit = quantity(redis["resources"]["limits"]["memory"])
    assert 0 < redis_memory(settings["maxmemory"]) <= 0.75 * limit


def test_the_status_page_and_the_metrics_hold_nothing_that_acts() -> None:
    """The page and the metrics run as identities of their own (no API token, no Vault role), on a
    reader's configuration (the published view; no key-service token, no sink, no fingerprint or
    signing key) and mount one key of the Secret: the read-only Redis user's password. Never the
    writer's password the workers and beat use: a compromised page cannot push a task or write a
    record. The example Redis makes exactly the ACL users docs/operations.md gives; its
    NetworkPolicy admits rotator's pods only."""
    from tests.test_readonly import acl_lines

    readers = {"rotator-web": "rotator-web-config", "rotator-metrics": "rotator-metrics-config"}
    writer_pods = {w["metadata"]["name"] for w in workloads()
                   if w["metadata"]["labels"].get("app.kubernetes.io/name") == "rotator"} - set(readers)
    assert writer_pods == {"rotator-worker", "rotator-beat"}
    for name, config_map in readers.items():
        pod = named("Deployment", name)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name and pod["automountServiceAccountToken"] is False
        assert named("ServiceAccount", name)["automountServiceAccountToken"] is False
        assert config_map_of(named("Deployment", name)) == config_map
        config = rotator_config(config_map)
        settings = _validated({**config, "state": {**config["state"], "password_file": None}})
        assert settings.reader_only and config["state"]["redis_url"].startswith("redis://rotator-view@")
        assert set(config) <= {"state", "view", "web"}  # no keyservice, engine, sinks or signing section
        [credentials] = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert [i["key"] for i in credentials["items"]] == ["redis-view-password"], name
        assert not [v for v in pod["volumes"] if "projected" in v], name  # no Vault token
        assert not any(m.endswith("/") for m in mounted_files(named("Deployment", name)))
    for name in writer_pods:
        config = rotator_config(config_map_of(named("Deployment", name)))
        assert config["state"]["redis_url"].startswith("redis://rotator@")
        assert config["celery"]["broker_url"].startswith("redis://rotator@")
        assert config["view"]["publish_every_s"] > 0 and "private_key_file" in config["signing"]
    others = {w["spec"]["template"]["spec"].get("serviceAccountName") for w in workloads()
              if w["metadata"]["name"] not in readers}
    assert not others & set(readers)

    [redis_container] = containers(named("StatefulSet", "redis"))
    args = " ".join(redis_container["args"])
    for line in acl_lines():
        user = line.removeprefix("ACL SETUSER ")
        user = user.replace("<writer password>", "$(REDIS_PASSWORD)").replace(
            "<reader password>", "$(REDIS_VIEW_PASSWORD)")
        assert f"--user {user}" in args, user
    assert "--user default off" in args and "requirepass" not in args
    namespace = rotator_config("rotator-config")["state"].get("namespace", "rotator")
    assert f"~{namespace}:* " in args  # the reader's key pattern is the workers' state namespace
    [policy] = [d for _, d in manifests() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "redis"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "rotator"}}}], "ports": [{"port": "redis"}]}]

    [container] = containers(named("Deployment", "rotator-web"))
    assert quantity(container["resources"]["limits"]["memory"]) >= 2**30
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "--from-file=redis-view-password=" in docs and "auth/kubernetes/role/rotator-web" not in docs
