"""Rotating by hand: `rotate` (a plan, `--apply`, `--enqueue`) and `reconcile` (drift, `--repair`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rotator.cli.base import (
    ConfigOption,
    Flag,
    JsonOption,
    Strategy,
    app,
    engine_for,
    errors_exit,
    fail,
    need_signer,
    use_config,
)
from rotator.console import err, out, print_json, show, unreachable
from rotator.errors import BudgetSpent, RotatorError

if TYPE_CHECKING:
    from rotator.engine import Engine


@app.command()
def rotate(
    config: ConfigOption = None,
    all_due: Annotated[bool, Flag("--all-due", help="Every due key in scope.")] = False,
    client_id: Annotated[str | None, typer.Option("--client-id", help="One key: its Client ID.")] = None,
    key_id: Annotated[str | None, typer.Option("--key-id", help="One key: its id.")] = None,
    apply: Annotated[bool, Flag("--apply", help="Rotate now; without it only the plan is shown.")] = False,
    force: Annotated[bool, Flag("--force", help="Rotate a key that is not due yet.")] = False,
    include_out_of_scope: Annotated[bool, Flag(
        "--include-out-of-scope",
        help="With --force: also a key the policy leaves alone (another environment, excluded).")] = False,
    enqueue: Annotated[bool, Flag(
        "--enqueue", help="With --apply: hand the rotations to the Celery workers instead of rotating here.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why: kept in the audit history.")] = "",
    strategy: Annotated[Strategy | None, typer.Option(
        "--strategy", help="reset or overlap for this run instead of the policy's strategy (docs/strategies.md).",
    )] = None,
    as_json: JsonOption = False,
) -> None:
    """Rotate due keys or one key by hand: a plan by default (what --apply would do), --apply to act.

    Exit 1 when a key was refused (no such key, out of scope) or a rotation did not finish."""
    if all_due == bool(client_id and key_id) or (client_id is None) != (key_id is None):
        fail("give --all-due, or both --client-id and --key-id", 2)
    if include_out_of_scope and not force:
        fail("--include-out-of-scope goes with --force: an out-of-scope key is never due", 2)
    settings = use_config(config)
    how = Strategy(strategy).value if strategy is not None else None  # a plain str from here on
    from rotator.plan import plan_all_due, plan_one

    if apply and enqueue:
        need_signer(settings)  # a message nobody signed would be refused by every worker
    unlisted: list[BudgetSpent] = []  # Client IDs whose rate budget is spent: not listed, the others go on
    with errors_exit():
        engine = engine_for(settings)
        if all_due:
            steps = plan_all_due(engine, how, unlisted)
        else:
            steps = iter([plan_one(engine, str(client_id), str(key_id), force, include_out_of_scope, how)])
        if apply and enqueue:
            _enqueue(engine, steps, force, include_out_of_scope, reason, as_json, how)
            _say_unlisted(unlisted)
            return
        plan = list(steps)
        if not apply:
            _print_plan(plan, as_json, enqueue)
            _say_unlisted(unlisted)
            return
        results: list[Any] = []
        held: dict[str, Any] = {}  # per Client ID: its rate budget is spent, its other keys wait untried
        for step in plan:
            if step.ref.client_id in held and step.action == "rotate":
                results.append(replace(held[step.ref.client_id], key_id=step.ref.key_id))
                continue
            if step.action == "skip":
                results.append(step.as_skipped())
                continue
            if step.action == "refuse":  # nothing is sent; the refusal goes into the history
                results.append(engine.record_refusal(step.ref, step.why, reason))
                continue
            # --all-due: the generation planned travels along, so a key a worker rotated meanwhile is
            # not rotated again; one key named by a person is rotated as asked.
            with err.status(f"rotating {show(step.ref)}…"):
                results.append(engine.rotate(step.ref, trigger="manual", force=force, reason=reason,
                                             generation=step.generation if all_due else None,
                                             include_out_of_scope=include_out_of_scope, strategy=how))
            if results[-1].status == "deferred":
                held[step.ref.client_id] = results[-1]
        engine.close()
    if not plan:
        err.print("no key is due")
    if as_json:
        print_json({"applied": True, "results": [r.to_dict() for r in results]})
    else:
        tried = [r for r in results if r.status != "deferred"]
        for res in tried:
            colour = "green" if res.ok else ("yellow" if res.status == "skipped" else "red")
            out.print(f"[{colour}]{show(res.status)}[/{colour}] {show(res.client_id)}/{show(res.key_id)} "
                      f"{show(res.reason)}")
        for client, first in held.items():
            waiting = [f"{r.client_id}/{r.key_id}" for r in results if r.status == "deferred" and r.client_id == client]
            named = ", ".join(waiting[:10]) + (f" and {len(waiting) - 10} more" if len(waiting) > 10 else "")
            err.print(f"[yellow]stopped[/yellow]: {len(waiting)} key(s) deferred ({show(named)}): "
                      f"{show(first.reason)}", highlight=False)
    _say_unlisted(unlisted)
    # Exit 0 only if every rotation finished and verified; a key behind a lease, in doubt or at
    # risk is not finished, and neither is a forced key that was skipped or a refused one.
    if not all(r.status in ("succeeded", "recovered") or (r.status == "skipped" and not force) for r in results):
        raise typer.Exit(1)


def _say_unlisted(unlisted: list[BudgetSpent]) -> None:
    """Client IDs the rate budget kept from being listed: said, and exit 1 (after the rest)."""
    for spent in unlisted:
        err.print(f"[yellow]stopped[/yellow] listing {show(spent.client_id)}: {show(str(spent))}; its due keys "
                  "were not planned; run it again after that", highlight=False)
    if unlisted:
        raise typer.Exit(1)


def _print_plan(plan: list[Any], as_json: bool, enqueue: bool) -> None:
    """What --apply would do, key by key; exit 1 when a key would be refused."""
    if as_json:
        print_json({"applied": False, "plan": [step.to_dict() for step in plan]})
    else:
        colours = {"rotate": "green", "skip": "yellow", "refuse": "red"}
        for step in plan:
            colour = colours[step.action]
            out.print(f"[{colour}]{'would ' + step.action}[/{colour}] {show(step.ref)}: {show(step.why)}")
        rotating = sum(step.action == "rotate" for step in plan)
        how = "--apply --enqueue to send them to the workers" if enqueue else "--apply to rotate"
        err.print(f"{len(plan)} key(s), {rotating} to rotate; nothing changed (add {how})" if plan
                  else "no key is due; nothing changed")
    if any(step.action == "refuse" for step in plan):
        raise typer.Exit(1)


def _enqueue(engine: Engine, steps: Iterator[Any], force: bool, include_out_of_scope: bool, reason: str,
             as_json: bool, strategy: str | None = None) -> None:
    """One rotate_key message per key to rotate, sent while the pages arrive, on one connection."""
    from rotator.gate import signer
    from rotator.tasks import app as celery_app
    from rotator.tasks import rotate_key

    me = signer()
    actor = me.name if me is not None else engine.ctx.actor  # the identity the workers will record
    now = time.time()
    sent: list[tuple[str, str]] = []
    refused = []
    failed = ""
    engine.state.now()  # Redis answers (the audit entry is written there) before anything is sent
    with celery_app.producer_or_acquire() as producer:
        for step in steps:
            if step.action != "rotate":
                refused.append(step)
                if step.action == "refuse":
                    engine.record_refusal(step.ref, step.why, reason)
                if not as_json:
                    out.print(f"[yellow]not sent[/yellow] {show(step.ref)}: {show(step.why)}")
                continue
            # The generation this command saw travels with it: a redelivered message for a key
            # rotated since is skipped, even with --force.
            args = (step.ref.client_id, step.ref.key_id, "manual", step.generation, force, reason, actor,
                    include_out_of_scope, strategy)
            try:
                sent.append((str(step.ref), rotate_key.apply_async(args, producer=producer).id))
            except Exception as exc:
                lost = _publish_refused(exc)
                if lost is None:
                    raise
                failed = f"{show(step.ref)}: {lost}; {len(sent)} sent before it, the rest not sent"
                break
    try:
        engine.state.record({"kind": "manual", "time": now, "actor": actor, "action": "enqueue",
                             "keys": [k for k, _ in sent], "reason": reason})
    except RotatorError as exc:  # the messages are sent: say what was not written, and go on
        err.print(f"[yellow]not in the audit history:[/yellow] {show(exc)}", highlight=False)
    if failed:
        err.print(f"[red]not sent[/red] {failed}", highlight=False)
    if as_json:
        print_json({"applied": True, "enqueued": [i for _, i in sent],
                    "not_sent": [step.to_dict() for step in refused], **({"failed": failed} if failed else {})})
    else:
        err.print(f"{len(sent)} rotation(s) sent to the workers")
    if failed or any(step.action == "refuse" for step in refused):
        raise typer.Exit(1)


def _publish_refused(exc: BaseException) -> str | None:
    """Why the broker did not take a message, in one line; None for an error that is not the
    broker's (a bug, which keeps its traceback)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ == "MessageNacked":
            return ("RabbitMQ refused the message (a publisher-confirm nack: a full queue that rejects "
                    "publishes, or a resource alarm)")
        seen = seen.__cause__ or seen.__context__
    return unreachable(exc)


@app.command()
def reconcile(config: ConfigOption = None,
              repair: Annotated[bool, Flag("--repair", help="Recover attempts and re-rotate drift.")] = False,
              as_json: JsonOption = False) -> None:
    """Compare the key service with every sink; --repair fixes what drifted.

    Exit 0 only when nothing drifted, or --repair left nothing unrepaired (behind a lease, in
    doubt, at risk, failed). Sink entries of keys the key service no longer lists are reported as
    orphans (never deleted, not failures)."""
    settings = use_config(config)
    stopped = None
    orphans: list[Any] = []
    unlisted: list[tuple[str, str]] = []
    with errors_exit():
        engine = engine_for(settings)
        try:
            if repair:
                drift, results = engine.repair()
            else:
                drift, results = engine.drift(), []
        except BudgetSpent as exc:  # say what was done, and until when the rest waits
            stopped, drift, results = exc, list(getattr(exc, "drifted", [])), list(getattr(exc, "done", []))
        if stopped is None:
            try:
                orphans, unlisted = engine.orphans()
            except BudgetSpent as exc:
                stopped = exc
    repaired = [r.to_dict() for r in results]
    fixed = [r for r in repaired if r["status"] in ("succeeded", "recovered")]
    left = [r for r in repaired if not r["ok"]]
    from rotator.fleet import drift_dict

    report: dict[str, Any] = {
        "drift": [drift_dict(d) for d in drift],
        "repaired": repaired, "unrepaired": len(left),
        "orphans": [{"sink": o.sink, "where": o.where, "client_id": o.ref.client_id, "key_id": o.ref.key_id}
                    for o in orphans],
        "orphans_not_checked": [{"sink": sink, "reason": why} for sink, why in unlisted],
        **({"stopped": {"client_id": stopped.client_id, "until": stopped.until, "reason": str(stopped)}}
           if stopped is not None else {})}
    if as_json:
        print_json(report)
    else:
        for d in report["drift"]:
            where = f"{d['client_id']}/{d['key_id']} {d['sink']}"
            out.print(f"drift {show(where)}: {show(d['reason'])}")
        for r in left:
            out.print(f"[red]{show(r['status'])}[/red] {show(r['client_id'])}/{show(r['key_id'])}: {show(r['reason'])}")
        for o in orphans:
            out.print(f"[yellow]orphan[/yellow] {show(o.where)}: {show(o.ref)} is no longer at the key service "
                      "(a dead secret; delete it by hand when no application reads it)")
        for sink, why in unlisted:
            err.print(f"[yellow]orphans not checked[/yellow] in {show(sink)}: {show(why)}")
        summary = f"{len(drift)} drifted"
        if repair:
            summary += f"; {len(fixed)} repaired; {len(left)} left unrepaired"
        if orphans:
            summary += f"; {len(orphans)} orphaned sink entries (not counted as failures)"
        err.print(summary)
        if stopped is not None:
            err.print(f"[yellow]stopped[/yellow]: {show(str(stopped))}; run it again after that", highlight=False)
    if left or (drift and not repair) or stopped is not None:
        raise typer.Exit(1)
