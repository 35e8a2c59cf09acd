"""What is there: `scan` (every key and its state) and `status` (rotations, attempts, history)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rotator.cli.base import (
    ConfigOption,
    Flag,
    JsonOption,
    app,
    engine_for,
    errors_exit,
    need_full,
    settings_or_exit,
    use_config,
)
from rotator.console import err, print_json, print_table, show
from rotator.errors import BudgetSpent

if TYPE_CHECKING:
    pass


@app.command()
def scan(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every key with its age and state: due, due_soon, ok, excluded, out_of_scope."""
    from rotator.runtime import build_budget, build_keyservice, build_state
    from rotator.scan import scan as run_scan

    settings = settings_or_exit(config)
    need_full(settings)
    with errors_exit():
        budget = build_budget(settings, build_state(settings, timeout_s=2.0), fail_open=True)
        service = build_keyservice(settings.keyservice, budget=budget)
        rows = []
        held: list[BudgetSpent] = []  # a Client ID whose rate budget is spent is skipped; the others go on
        try:
            now = time.time()
            with err.status("Scanning…") as status:
                for count, row in enumerate(
                    run_scan(service, settings.policy.to_policy(), now, settings.keyservice.clients, held), 1
                ):
                    rows.append(row)
                    if count % 100 == 0:
                        status.update(f"Scanning… {count} keys")
        finally:
            service.close()
    for spent in held:
        err.print(f"[yellow]stopped[/yellow] listing {show(spent.client_id)}: {show(str(spent))}; "
                  "run it again after that", highlight=False)
    if as_json:
        print_json([r.to_dict() for r in rows])
        if held:
            raise typer.Exit(1)
        return
    colours = {"due": "red", "due_soon": "yellow", "ok": "green"}
    print_table(("client_id", "key_id", "alias", "environment", "age_days", "state"), [
        (r.key.client_id, r.key.key_id, r.key.alias, r.key.environment.value, f"{r.age_days:.1f}",
         (r.state.value, colours.get(r.state.value, "dim"))) for r in rows])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    err.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no keys", highlight=False)
    if held:
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False,
           history: Annotated[bool, Flag("--history", help="Also show the audit history.")] = False,
           limit: Annotated[int, typer.Option(help="History entries to show.")] = 50) -> None:
    """Per key: last rotation, in-flight attempts, next due date; and drift."""
    settings = use_config(config)
    from rotator.domain import utc_iso
    from rotator.fleet import status_report

    with errors_exit():
        if settings.view.published:  # what the workers published: no token needed here
            from rotator import view
            from rotator.runtime import build_state

            report = view.report(build_state(settings), limit if history else 0)
        else:
            report = status_report(engine_for(settings, looking=True), history=limit if history else 0,
                                   with_sinks=False)
    if as_json:
        print_json(report)
        return
    rows, drift, entries = report["keys"], report["drift"], report["history"]
    table = []
    for r in rows:
        last = r["last_rotation"]
        text = f"{last['status']} ({last['trigger']}) {utc_iso(last['time'])}" if last else "-"
        base = r.get("base_alias") or r["alias"]
        alias = r["alias"] if base == r["alias"] else f"{r['alias']} (lineage {base})"
        state = r["state"]
        if r.get("retiring"):
            state += f" -> {r['retiring']['successor']}, revoked after {r['retiring']['revoke_at'] or 'its grace'}"
        table.append((f"{r['client_id']}/{r['key_id']}", alias, state, f"{r['age_days']:.1f}",
                      r["next_due"], text, r["in_flight"] or ""))
    print_table(("key", "alias", "state", "age_days", "next_due", "last rotation", "in flight"), table)
    for d in drift:
        err.print(f"[red]drift[/red] {show(d['client_id'])}/{show(d['key_id'])} {show(d['sink'])}: "
                  f"{show(d['reason'])}")
    from rotator.budget import describe, from_dict

    for found in report.get("rate_budget") or []:  # a view an older worker published has none
        paused = "[yellow]rate budget[/yellow]" if found.get("paused_until") else "rate budget"
        err.print(f"{paused} {show(found['client_id'])}: {show(describe(from_dict(found)))}", highlight=False)
    if entries:
        print_table(("time", "actor", "kind", "key", "trigger", "result", "note / reason / sinks"),
                    [_audit_row(e) for e in entries])


def _audit_row(entry: dict[str, Any]) -> tuple[str, ...]:
    """One history entry: the note (e.g. `--reason`), the result's reason and the sinks, all shown."""
    from rotator.domain import utc_iso

    keys = (f"{entry.get('client_id')}/{entry.get('key_id')}" if entry.get("client_id")
            else ", ".join(entry.get("keys", [])))
    sinks = ", ".join(f"{k}: {v}" for k, v in (entry.get("sinks") or {}).items())
    hooks = ", ".join(f"{k}: {v}" for k, v in (entry.get("reload") or {}).items())
    detail = "; ".join(str(part) for part in dict.fromkeys(
        (entry.get("note"), entry.get("reason"), sinks and f"sinks {sinks}", hooks and f"reload {hooks}")) if part)
    return (utc_iso(entry["time"]), str(entry.get("actor", "")), str(entry.get("kind", "")), keys,
            str(entry.get("trigger", entry.get("action", ""))), str(entry.get("status", "")), detail)
