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


def rotator_config() -> dict[str, Any]:
    return tomllib.loads(named("ConfigMap", "rotator-config")["data"]["rotator.toml"])


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


def test_one_beat_that_never_overlaps_a_new_one() -> None:
    """Beat: one replica, `Recreate`, not scaled by the kustomization, a private writable state dir."""
    beats = [w for w in workloads() if w["metadata"]["labels"].get("app.kubernetes.io/component") == "beat"]
    assert [b["metadata"]["name"] for b in beats] == ["rotator-beat"]
    beat = beats[0]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
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
    data = rotator_config()
    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and key.endswith("_file"):
                    files.append(value)
                elif isinstance(value, str) and CREDENTIAL_NAME.search(key) and not key.endswith("_env"):
                    pytest.fail(f"{key} holds a value in the ConfigMap")
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    assert len(files) >= 4
    # Valid as it stands once each named file exists (check-config's own checks).
    text = named("ConfigMap", "rotator-config")["data"]["rotator.toml"]
    for index, path in enumerate(sorted(set(files))):
        stand_in = tmp_path / f"credential-{index}"
        stand_in.write_text("x" * 32)
        text = text.replace(f'"{path}"', f'"{stand_in}"')
    _validated(tomllib.loads(text))
    for workload in workloads():
        if workload["metadata"]["labels"]["app.kubernetes.io/name"] != "rotator":
            continue
        pod = workload["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v or "projected" in v}
        [container] = containers(workload)
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in secret_volumes]
        for path in files:
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (workload["metadata"]["name"], path)
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
