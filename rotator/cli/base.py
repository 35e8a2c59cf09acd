"""What every command shares: the app and its flag and option types, the configuration loaded
or refused in one line per problem, and the exit codes (0 success, 1 a rotation or check failed,
2 bad usage or configuration; a service that does not answer is one line and exit 1)."""

from __future__ import annotations

import enum
import os
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
from rotator.console import err, show, unreachable
from rotator.errors import BudgetSpent, ConfigError, RotatorError

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
    except BudgetSpent as exc:  # nothing failed: it stops here and says when to come back
        fail(f"stopped: {exc}; run it again after that", 1)
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


def report_checks(checks: Iterable[tuple[str, str | None]]) -> None:
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


def need_full(settings: Settings) -> None:
    """A reader's configuration (the published view, no sinks) holds no credential to act with."""
    if settings.reader_only:
        fail("this is a reader's configuration (view.source = \"published\", no [[sinks]]): it can show the fleet "
             "(web, metrics, status) but not rotate, scan or run workers; use the workers' configuration", 2)


def engine_for(settings: Settings, looking: bool = False) -> Engine:
    """An engine for a command run by a person: its events reach the alert channels via the workers.
    `looking` (`status`): its calls spend from the rate budget past the share (`RateBudget.for_people`)."""
    from rotator.runtime import build_engine
    from rotator.safety import no_core_dumps

    need_full(settings)
    no_core_dumps()  # `rotate --apply` and `reconcile --repair` hold a new secret in this process
    if settings.alerts:
        from rotator.tasks import CeleryPublisher

        return build_engine(settings, publisher=CeleryPublisher(), looking=looking)
    return build_engine(settings, looking=looking)


def use_config(config: Path | None) -> Settings:
    """Validate, then export the path so Celery's config module reads the same file."""
    settings = settings_or_exit(config)
    os.environ["ROTATOR_CONFIG"] = str(config_path(config).resolve())
    return settings


class Strategy(enum.StrEnum):
    RESET = "reset"
    OVERLAP = "overlap"


keys_app = _App(help="Signing keys and the other keys an installation needs.", no_args_is_help=True)

def need_signer(settings: Settings) -> Any:
    """This process's signer, or exit 2 saying why it has none (a missing or unreadable key)."""
    from rotator.gate import make_signer
    from rotator.signing import KeyFileError

    try:
        return make_signer(settings)
    except (KeyFileError, OSError) as exc:
        fail(f"no signing key: {exc}; `rotator keys init DIR` makes one", 2)
