"""What `rotate --apply` would do, decided before anything changes: the plan the CLI shows.

A plan looks every key up, so it says "no such key", "out of scope" or "not due; add --force"
instead of promising a rotation that `--apply` would then skip. The engine decides again under
the key's lease; the plan only tells the operator what to expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rotator.aliases import AliasTemplate
from rotator.domain import ApiKey, KeyRef, utc_iso
from rotator.errors import BudgetSpent, NotFoundError, PermanentError, RotatorError
from rotator.places import due_with_places
from rotator.policy import DAY, age_seconds, due_at, is_due, scope_problem, strategy_for
from rotator.scan import scan

if TYPE_CHECKING:
    from rotator.engine import Engine, RotationResult

Action = Literal["rotate", "skip", "refuse"]


@dataclass(frozen=True, slots=True)
class Step:
    ref: KeyRef
    action: Action
    why: str
    generation: str | None = None  # the key's generation when planned (travels with an enqueued task)
    age_days: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.ref.client_id, "key_id": self.ref.key_id, "action": self.action,
                "reason": self.why, "age_days": self.age_days}

    def as_skipped(self) -> RotationResult:
        """A step that skips its key, as the result `--apply` reports for it."""
        from rotator.engine import RotationResult

        return RotationResult(self.ref.client_id, self.ref.key_id, "skipped", self.why, trigger="manual")


def plan_one(engine: Engine, client_id: str, key_id: str, force: bool, include_out_of_scope: bool,
             strategy: str | None = None) -> Step:
    ref = KeyRef(client_id, key_id)
    try:
        key = engine.keyservice.get_key(client_id, key_id)
    except NotFoundError:
        return Step(ref, "refuse", "no such key: not found at the key service")
    if key.replaced_by is not None:
        return _retire_step(engine, key)
    step = step_for(key, engine.clock(), engine, force, include_out_of_scope, strategy)
    if step.action == "rotate":
        for sink in engine.sinks:
            try:
                sink.read_state(key)  # a place that holds another key's document refuses (PermanentError)
            except PermanentError as exc:
                return Step(ref, "refuse", f"{exc}; nothing would be reset", step.generation, step.age_days)
            except RotatorError:
                continue  # unreachable now: `--apply` decides when it prepares the sinks
    return step


def plan_all_due(engine: Engine, strategy: str | None = None, held: list[BudgetSpent] | None = None) -> Iterator[Step]:
    """Every due key in scope, and every retiring key whose grace is over; one whose sink place
    another key would share is refused (found over the whole listing, so both keys are). With
    `held`, a Client ID whose rate budget is spent is not listed (its `BudgetSpent` goes there)."""
    now = engine.clock()
    rows = scan(engine.keyservice, engine.policy, now, engine.clients, held)
    for key, conflict in due_with_places(rows, engine.sinks, engine.retire_at, now):
        if conflict is not None:
            age = round(age_seconds(key, now) / DAY, 2)
            yield Step(key.ref, "refuse", f"{conflict}; nothing would be reset", str(key.generation), age)
        elif key.replaced_by is not None:
            yield Step(key.ref, "rotate", f"retire: its grace is over (successor {key.replaced_by})",
                       str(key.generation), round(age_seconds(key, now) / DAY, 2))
        else:
            yield step_for(key, now, engine, False, False, strategy)


def _retire_step(engine: Engine, key: ApiKey) -> Step:
    """A key that a successor replaces: the plan says when it is revoked."""
    age = round(age_seconds(key, engine.clock()) / DAY, 2)
    successor = engine.successor(key)
    if successor is None:
        return Step(key.ref, "skip", f"its successor {key.replaced_by} is gone; nothing to revoke",
                    str(key.generation), age)
    when = utc_iso(engine.retire_at(key, successor))
    if engine.retire_at(key, successor) <= engine.clock():
        return Step(key.ref, "rotate", f"retire (successor {successor.key_id}; due {when}), once every sink "
                    "holds the successor and its secret works", str(key.generation), age)
    return Step(key.ref, "skip", f"retiring: successor {successor.key_id}; revoked after {when}",
                str(key.generation), age)


def step_for(key: ApiKey, now: float, engine: Engine, force: bool, include_out_of_scope: bool,
             strategy: str | None = None) -> Step:
    age = age_seconds(key, now) / DAY
    generation = str(key.generation)
    scope = scope_problem(key, engine.policy)
    if scope is not None and not include_out_of_scope:
        return Step(key.ref, "refuse", f"{scope} ({key.environment.value}, age {age:.1f} d); "
                    "--force --include-out-of-scope rotates it anyway", generation, round(age, 2))
    cannot = getattr(engine.keyservice, "cannot_reset", None)
    how = strategy_for(key, engine.policy, strategy, can_reset=cannot is None)
    template = getattr(engine.keyservice, "template", None)
    if how == "reset":
        by = ""
    elif isinstance(template, AliasTemplate):
        by = (f"; overlap (alias template {template.text!r}): a new key of lineage {key.base_alias!r} with its "
              f"scopes, read at the place of {key.base_alias!r}, this key revoked "
              f"{engine.policy.overlap_grace_s / DAY:g} d after it is stored")
    else:
        by = (f"; overlap: a successor with its alias and scopes, this key revoked "
              f"{engine.policy.overlap_grace_s / DAY:g} d after it is stored")
    if is_due(key, now, engine.policy):
        return Step(key.ref, "rotate", f"due (age {age:.1f} d){by}", generation, round(age, 2))
    due = utc_iso(due_at(key, engine.policy))
    if force:
        return Step(key.ref, "rotate", f"forced (age {age:.1f} d; due {due}){by}", generation, round(age, 2))
    return Step(key.ref, "skip", f"not due (age {age:.1f} d; due {due}); add --force to rotate it now",
                generation, round(age, 2))
