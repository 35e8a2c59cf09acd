"""A real Celery worker against a lying key service: whatever the answer, no secret (nor an
Idempotency-Key, which reads one) reaches the result backend, a log line or Redis, nothing is stored under another key, and the task's stored
failure (when one is stored) is rotator's own sanitised one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hostile_server import TOKEN, LyingKeyService, RawServer
from tests.signed import local_signer, publishing_as
from tests.test_celery import Cluster, vault, wait_for

pytestmark = pytest.mark.slow
__all__ = ["vault"]  # the Vault test server fixture, shared with test_celery


@pytest.fixture(params=["reset_surrogate_secret", "reset_secret_in_environment", "reset_names_other_key",
                        "replay_unavailable"])
def lying(request: pytest.FixtureRequest) -> Iterator[tuple[LyingKeyService, str]]:
    service = LyingKeyService(request.param)
    with RawServer(service.handle) as server:
        yield service, server.url


def test_a_worker_keeps_every_secret_of_a_lying_key_service_to_itself(
    lying: tuple[LyingKeyService, str], tmp_path: Path, redis_server: str, vault: Any
) -> None:
    """Each lie in turn, through `rotate_key` on a real worker with a result backend: the task ends
    (in doubt, nothing stored under another key), and no secret the service issued is anywhere."""
    service, url = lying
    cluster = Cluster(tmp_path, redis_server, url, vault.url, vault.root_token)
    cluster.env["ROTATOR_KEYSERVICE_TOKEN"] = TOKEN
    try:
        cluster.worker()
        from celery import Celery

        app = Celery(broker=cluster.broker_url, backend=f"{redis_server}/2")
        app.conf.task_default_queue = "rotator"
        with publishing_as(local_signer()):
            result = app.send_task("rotator.rotate_key", args=["acme", "key_due", "schedule", None],
                                   task_id=str(uuid.uuid4()))
        outcome = result.get(timeout=60, propagate=False)
        assert service.resets == ["key_due"]  # one reset, never repeated
        assert isinstance(outcome, dict) and outcome["status"] == "in_doubt", outcome
        assert not (tmp_path / "secrets" / "acme" / "key_young.secret").exists()
        wait_for(lambda: b"rotation.in_doubt" in b"".join(p.read_bytes() for p in cluster.outputs if p.exists()),
                 10, "the worker's log of the doubt")
        written = cluster.everything_written() + json.dumps(outcome)
        for secret in service.issued:
            assert secret not in written and secret[:24] not in written
        assert service.idempotency_keys  # each reads a live secret from the stored answer: as secret
        for key in service.idempotency_keys:
            assert key not in written
    finally:
        cluster.stop()


def test_the_task_boundary_withholds_the_text_of_foreign_exceptions() -> None:
    """A task that fails with an exception rotator did not make is stored and logged as TaskFailed
    naming only its class (its text may carry a value a peer sent), with nothing chained."""
    from rotator.errors import ProtocolError
    from rotator.tasks import TaskFailed, contained

    @contained
    def foreign() -> None:
        raise UnicodeEncodeError("utf-8", "prod_S3CRET\ud800", 11, 12, "surrogates not allowed")

    @contained
    def own() -> None:
        raise ProtocolError("POST /v2.01/acme/apikeys/key_due/reset: the answer names another key")

    with pytest.raises(TaskFailed) as info:
        foreign()
    assert "S3CRET" not in str(info.value) and "UnicodeEncodeError" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None
    with pytest.raises(TaskFailed, match="ProtocolError: POST .* names another key"):
        own()
