"""Two years of a fleet that nobody tends: the real engine over tests/sim.py's fakes, on the
simulation's clock, with beat's schedule and the catalogue's faults.

    python -m tests.longrun --seeds 20                # more seeds on demand
    python -m tests.longrun --seed 3 --days 730 --keys 200

Each hour: timers fire (late commits), and the sweeps beat orders run as they would (recovery,
the automatic repair every `REPAIR_EVERY_H`, the daily scan inside the rotation window, the daily
full reconcile). The world: faults of the key service, the sinks and Redis (lost writes) at a
fraction of the chaos runs' rates, sinks down for hours, Redis wiped (once right after a reset
whose store failed), and rate budgets spent for hours. Nobody runs a command.

Checked every day and at the end: no production key older than `max_age_days` plus `AGE_BOUND_DAYS`;
every live secret missing from a sink for longer than two repair intervals told
(`rotation.secret_at_risk`) again within the last two; no generation reset twice; no secret lost (each secret a reset issued
reached every sink before the key moved on); no secret in any event, result or history entry.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rotator.domain import KeyRef
from rotator.engine import INLINE, Engine
from rotator.errors import BudgetSpent
from rotator.policy import Policy, RotationWindow, is_due
from tests.sim import DAY, FP, HORIZON_S, Sim, Violation, check, heads

MAX_AGE_DAYS = 90
WINDOW = "Mon-Thu 09:00-16:00 UTC"
SCAN_HOUR = 10  # beat's daily scan (UTC), inside the window's hours
RECONCILE_HOUR = 3
REPAIR_EVERY_H = 4  # the simulation's repair interval (the default is 15 minutes: a slower one is harder)
RECOVER_EVERY_H = 1
#: The documented bound past `max_age_days`: a day between scans, the window's longest gap (Thursday's
#: scan to Monday's: four days), and one more window for a deferral by the rate budget or a failed
#: attempt, twice.
AGE_BOUND_DAYS = 1 + 4 + 2 * 4
OUTAGE_MAX_H = 18.0  # a sink down longer than the replay window minus a repair interval could lose a secret


@dataclass
class LongRun:
    sim: Sim
    days: int
    rotations: int = 0
    deferred: int = 0
    wipes: int = 0
    outages: int = 0
    at_risk_alerts: int = 0
    worst_overrun_days: float = 0.0
    told_late: list[str] = field(default_factory=list)


def engine(sim: Sim, actor: str, clients: list[str]) -> Engine:
    return Engine(sim.service, list(sim.sinks), sim.state, sim.events, FP, Policy(max_age_days=MAX_AGE_DAYS),
                  sink_retry_s=300.0, lock_ttl_s=60.0, clock=lambda: sim.now, actor=actor, clients=clients,
                  horizon_s=HORIZON_S, window=RotationWindow.parse(WINDOW), executor=INLINE, sleep=sim.sleep,
                  monotonic=lambda: sim.now)


def run_years(seed: int, *, days: int = 730, keys: int = 200, clients: int = 4, fault_scale: float = 0.2) -> LongRun:
    sim = Sim(seed)
    outside = random.getstate()
    random.seed(seed)
    try:
        return _run(sim, days, keys, clients, fault_scale)
    except Violation as exc:
        exc.trace = sim.trace[-200:]  # type: ignore[attr-defined]
        raise
    finally:
        random.setstate(outside)


def _run(sim: Sim, days: int, keys: int, clients: int, fault_scale: float) -> LongRun:
    rng = sim.rng
    sim.fault_scale = fault_scale
    sim.state.may_lose = True
    ids = [f"c{c}" for c in range(clients)]
    start = datetime(2027, 1, 4, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
    sim.now = start
    for n in range(keys):  # every key younger than max_age_days at the start: none is overdue yet
        sim.service.add(f"k{n:03d}", int(start - rng.uniform(0, MAX_AGE_DAYS - 1) * DAY), ids[n % clients])
    run = LongRun(sim, days)
    policy = Policy(max_age_days=MAX_AGE_DAYS)
    window = RotationWindow.parse(WINDOW)
    wipes = sorted(rng.uniform(0, days * 24) for _ in range(3))
    outages = sorted((rng.uniform(0, days * 24), rng.choice(sim.sinks), rng.uniform(1, OUTAGE_MAX_H))
                     for _ in range(8))
    spent = sorted((rng.uniform(0, days * 24), rng.choice(ids), rng.uniform(1, 20)) for _ in range(12))
    wipe_after_risk = True  # the first at-risk reset: Redis is wiped right after it
    alerts_seen = 0
    for hour in range(days * 24):
        sim.now = start + hour * 3600 + rng.uniform(0, 60)
        sim._fire_timers()
        while wipes and wipes[0] <= hour:
            wipes.pop(0)
            sim.state.restart_empty()
            run.wipes += 1
        while outages and outages[0][0] <= hour:
            _, sink, length = outages.pop(0)
            sink.down_until = sim.now + length * 3600
            run.outages += 1
        while spent and spent[0][0] <= hour:
            _, client, length = spent.pop(0)
            sim.service.spent_until[client] = sim.now + length * 3600
        worker = engine(sim, "worker", ids)
        if hour % RECOVER_EVERY_H == 0:
            worker.recover_all()
        if hour % REPAIR_EVERY_H == 0:
            _swept(lambda: worker.repair(fresh=False, recent_only=True))
        if hour % 24 == RECONCILE_HOUR:
            _swept(lambda: worker.repair(fresh=False))
        if hour % 24 == SCAN_HOUR and window.contains(datetime.fromtimestamp(sim.now, UTC)):
            held: list[BudgetSpent] = []
            from rotator.scan import every_key

            due = [k for k in every_key(sim.service, ids, held) if is_due(k, sim.now, policy) and k.replaced_by is None]
            for key in due:
                result = worker.rotate(KeyRef(key.client_id, key.key_id), trigger="schedule",
                                       generation=str(key.generation))
                run.rotations += result.status in ("succeeded", "recovered")
                run.deferred += result.status == "deferred"
                if result.status == "at_risk" and wipe_after_risk:
                    wipe_after_risk = False
                    sim.state.restart_empty()
                    run.wipes += 1
            run.deferred += len(held)
        new_alerts = [e for e in sim.events.events[alerts_seen:] if e.name == "rotation.secret_at_risk"]
        alerts_seen = len(sim.events.events)
        run.at_risk_alerts += len(new_alerts)
        if hour % 24 == 23:
            daily_checks(run)
    # The end: the world heals, the sweeps run a day more; nothing may be left.
    sim.chaos = False
    for fake in (sim.service, sim.state, *sim.sinks):
        fake.faulty = False
    sim.service.spent_until.clear()
    for hour in range(days * 24, days * 24 + 24):
        sim.now = start + hour * 3600
        sim._fire_timers()
        worker = engine(sim, "worker", ids)
        worker.recover_all()
        _swept(lambda: worker.repair(fresh=False, recent_only=True))
    check(sim)
    never_stored = lost_secrets(sim)
    if never_stored:
        raise Violation(f"seed {sim.seed}: {len(never_stored)} secrets lost (replaced before every sink held them): "
                        f"{never_stored[:5]}")
    if after_loss := [e for e in sim.events.events if e.name == "rotation.secret_at_risk"
                      and "resetting afresh" in (e.error or "")]:
        raise Violation(f"seed {sim.seed}: {len(after_loss)} fresh resets after a lost secret")
    return run


def _swept(sweep: Callable[[], object]) -> None:
    with contextlib.suppress(BudgetSpent):  # deferred: the next sweep takes it
        sweep()


def daily_checks(run: LongRun) -> None:
    sim = run.sim
    for key_id, key in sim.service.keys.items():
        overrun = (sim.now - key.generation.born_at) / DAY - MAX_AGE_DAYS
        run.worst_overrun_days = max(run.worst_overrun_days, overrun)
        if overrun > AGE_BOUND_DAYS:
            raise Violation(f"seed {sim.seed}: {key_id} is {overrun:.1f} days past max_age_days "
                            f"(bound {AGE_BOUND_DAYS})")
    for key_id, key in heads(sim):
        if all(s.holds(key.base, key.secret) for s in sim.sinks):
            continue
        since = key.generation.born_at
        if sim.now - since < 2 * REPAIR_EVERY_H * 3600:
            continue
        lately = sim.now - 2 * REPAIR_EVERY_H * 3600  # told again by the sweeps, not once long ago
        if not any(e.name == "rotation.secret_at_risk" and e.key_id == key_id and e.time >= max(since - 1, lately)
                   for e in sim.events.events):
            raise Violation(f"seed {sim.seed}: the live secret of {key_id} has been missing from a sink for "
                            f"{(sim.now - since) / 3600:.1f} h and no rotation.secret_at_risk said so in the last "
                            f"{2 * REPAIR_EVERY_H} h")


def lost_secrets(sim: Sim) -> list[str]:
    """Secrets a reset issued that were the key's live secret and were replaced (by a later reset)
    before every sink held them: consumers never got them."""
    lost = []
    for ik, (_, key_id, status, answer) in sim.service.issued.items():
        if status != 200 or answer is None:
            continue
        secret = answer.secret.reveal()
        current = sim.service.keys.get(key_id)
        if current is not None and current.secret == secret:
            continue  # still live: the end checks hold it everywhere
        if not all(secret in s.first_held for s in sim.sinks):
            lost.append(f"{key_id} ik={ik[:10]}")
    return lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--days", type=int, default=730)
    parser.add_argument("--keys", type=int, default=200)
    args = parser.parse_args(argv)
    from rotator import logs

    logs.configure("CRITICAL")
    for seed in [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds):
        began = time.monotonic()
        try:
            run = run_years(seed, days=args.days, keys=args.keys)
        except Violation as exc:
            print(f"VIOLATION {exc}", file=sys.stderr)
            print("\n".join(getattr(exc, "trace", [])[-40:]), file=sys.stderr)
            return 1
        print(f"seed {seed}: {args.days} days, {args.keys} keys, {run.rotations} rotations, "
              f"{len(run.sim.service.ledger)} resets, {run.deferred} deferred, {run.wipes} Redis wipes, "
              f"{run.outages} sink outages, {run.at_risk_alerts} at-risk alerts, worst age "
              f"{MAX_AGE_DAYS + run.worst_overrun_days:.1f} days (bound {MAX_AGE_DAYS + AGE_BOUND_DAYS}), "
              f"{time.monotonic() - began:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
