"""Walk every key in scope and say what the policy makes of it. Streams; holds one page."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rotator.domain import ApiKey, KeyState
from rotator.errors import BudgetSpent
from rotator.policy import DAY, Policy, assess
from rotator.protocols import KeyService


@dataclass(slots=True)
class ScanRow:
    key: ApiKey
    state: KeyState
    age_days: float
    due_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.key.client_id,
            "key_id": self.key.key_id,
            "alias": self.key.alias,
            "base_alias": self.key.base_alias,  # its lineage's (the overlap strategy's alias-template mode)
            "replaces": self.key.replaces,  # the retiring key whose place it took (overlap), if any
            "environment": self.key.environment.value,
            "age_days": round(self.age_days, 2),
            "state": self.state.value,
            "due_at": self.due_at,
        }


def client_ids(service: KeyService, configured: Iterable[str] | None) -> Iterator[str]:
    """The configured Client IDs, else every one the token manages."""
    if configured is not None:
        yield from configured
    else:
        for client in service.list_clients():
            yield client.client_id


def every_key(service: KeyService, clients: Iterable[str] | None = None,
              held: list[BudgetSpent] | None = None) -> Iterator[ApiKey]:
    """Every key of the managed Client IDs, page by page. With `held`, a Client ID whose rate
    budget is spent is skipped (its `BudgetSpent` added there) and the others go on."""
    for client_id in client_ids(service, clients):
        try:
            yield from service.list_keys(client_id)
        except BudgetSpent as spent:
            if held is None:
                raise
            held.append(spent)


def scan(
    service: KeyService, policy: Policy, now: float, clients: Iterable[str] | None = None,
    held: list[BudgetSpent] | None = None,
) -> Iterator[ScanRow]:
    for key in every_key(service, clients, held):
        state, age, due = assess(key, now, policy)
        yield ScanRow(key, state, age / DAY, due)
