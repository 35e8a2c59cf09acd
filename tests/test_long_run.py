"""Two simulated years of a fleet nobody tends (tests/longrun.py), and proof that the run
catches a fleet that does not heal itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from rotator import logs
from rotator.engine import Engine, reconcile
from tests import longrun

SEEDS = int(os.environ.get("ROTATOR_LONGRUN_SEEDS", "2"))


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logs.configure("CRITICAL")
    yield
    logs.configure("WARNING")


@pytest.mark.timeout(600)
def test_two_years_of_200_keys_with_nobody_acting_keep_every_promise() -> None:
    """Daily scans in a Mon-Thu window, rate budgets spent for hours, sinks down for up to 18 h,
    Redis wiped (once right after a reset whose store failed), the catalogue's faults: no key
    past max_age_days plus the bound, no secret lost, no generation reset twice, every at-risk
    secret told (ROTATOR_LONGRUN_SEEDS seeds; `python -m tests.longrun` runs more)."""
    for seed in range(SEEDS):
        try:
            run = longrun.run_years(seed)
        except longrun.Violation as exc:
            trace = "\n".join(getattr(exc, "trace", [])[-60:])
            pytest.fail(f"{exc}\n--- the last steps ---\n{trace}\nreplay: python -m tests.longrun --seed {seed}")
        ledger = run.sim.service.ledger
        assert len(ledger) > 1400 and run.rotations > 1300  # 200 keys every ~92 days for two years
        assert run.wipes >= 3 and run.outages == 8 and run.at_risk_alerts > 0
        assert run.worst_overrun_days > 0  # keys did wait for the window past max_age_days


def test_without_the_automatic_repair_the_long_run_finds_a_lost_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beat's reconcile as it was: it only reports. After a Redis wipe that follows an at-risk
    reset, nothing replays the secret or tells it again, and the run says so."""
    def report_only(self: Engine, fresh: bool = True, recent_only: bool = False) -> Any:
        if fresh:
            return reconcile.repair(self.ctx)
        self.recover_all()
        return self.drift(), []

    monkeypatch.setattr(Engine, "repair", report_only)
    with pytest.raises(longrun.Violation, match="not stored after recovery|secrets lost|fresh resets|said so"):
        longrun.run_years(0, days=240, keys=60)
