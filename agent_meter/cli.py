"""The ``agent-meter`` command line.

::

    agent-meter init [FILE]                      write a commented pricing.toml to start from
    agent-meter demo [--db PATH]                 a scripted, offline agent run
    agent-meter balance CUSTOMER   --db PATH     what a customer has left
    agent-meter events CUSTOMER    --db PATH     a customer's ledger lines
    agent-meter report             --db PATH     usage per customer and feature
    agent-meter pricing check FILE               validate a pricing file, show what it defines

``--db`` and ``--pricing`` go before or after the command; they default to the
``AGENT_METER_DB`` and ``AGENT_METER_PRICING`` environment variables. Read commands open
the ledger read-only: they never create or change a file, and read a ledger in a
read-only directory. Output piped to a file or a program is never wrapped or cut at a
terminal width. Every error is one line on stderr and a non-zero exit; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from agent_meter.errors import AgentMeterError, ConfigError, CustomerNotFound
from agent_meter.tables import output_console
from agent_meter.wording import amount

__all__ = ["cli", "main"]

DB_ENV = "AGENT_METER_DB"
PRICING_ENV = "AGENT_METER_PRICING"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Settings:
    """What the group's options set, for the commands below it."""

    debug: bool = False
    db: Path | None = None
    pricing: Path | None = None


class _OneLineErrors(click.Group):
    """Turns any failure of a command into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except AgentMeterError as exc:
            if ctx.params.get("debug"):
                raise
            _fail(ctx, str(exc))
        except Exception as exc:  # the CLI promises one line, never a traceback
            if ctx.params.get("debug"):
                raise
            _fail(ctx, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")


def _fail(ctx: click.Context, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(1)


def _ledger_options(command: F) -> F:
    """``--db`` and ``--pricing`` after the command name too (they override the group's)."""
    command = click.option(
        "--pricing",
        "pricing_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"A pricing file (TOML) [env: {PRICING_ENV}].",
    )(command)
    return click.option(
        "--db",
        "db_path",
        type=click.Path(path_type=Path),
        help=f"The ledger file (SQLite) [env: {DB_ENV}].",
    )(command)


def _settings(ctx: click.Context) -> _Settings:
    settings = ctx.find_object(_Settings)
    return settings if settings is not None else _Settings()


@click.group(cls=_OneLineErrors)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    envvar=DB_ENV,
    help=f"The ledger file (SQLite) [env: {DB_ENV}].",
)
@click.option(
    "--pricing",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=PRICING_ENV,
    help=f"A pricing file (TOML) [env: {PRICING_ENV}].",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, db: Path | None, pricing: Path | None) -> None:
    """agent_meter: a billing guard in front of every tool an LLM agent can call."""
    ctx.obj = _Settings(debug=debug, db=db, pricing=pricing)


# -- demo ------------------------------------------------------------------------------


@cli.command()
@click.argument("file", default="pricing.toml", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def init(file: Path, force: bool) -> None:
    """Write a commented example pricing to FILE (default: pricing.toml) to edit."""
    from agent_meter.pricing import example_toml  # noqa: PLC0415 - keeps --help fast

    if file.exists() and not force:
        msg = f"{file} exists; pass --force to overwrite it"
        raise ConfigError(msg)
    try:
        file.write_text(example_toml(), encoding="utf-8")
    except OSError as exc:
        msg = f"{file}: cannot write the pricing file ({exc.strerror or exc})"
        raise ConfigError(msg) from exc
    click.echo(f"wrote {file}: edit it, then check it with: agent-meter pricing check {file}")


@cli.command()
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    help="Keep the demo ledger in this file (a new file, or a ledger of an earlier demo).",
)
@click.option(
    "--credits",
    default=7.0,
    show_default=True,
    type=click.FloatRange(min=0, max=1_000_000),
    callback=lambda _ctx, _param, value: _finite(value),
    help="Credits the customer starts with (0 to 1,000,000).",
)
@click.pass_context
def demo(ctx: click.Context, db: Path | None, credits: float) -> None:
    """Run a scripted, offline agent on the embedded backend."""
    from agent_meter.demo import run_demo  # noqa: PLC0415 - keeps --help fast

    if db is None and ctx.parent is not None:
        # `agent-meter --db PATH demo` means this file; AGENT_METER_DB alone does not: the
        # demo writes a customer and its usage, and must never do so into a real ledger.
        source = ctx.parent.get_parameter_source("db")
        if source is click.core.ParameterSource.COMMANDLINE:
            db = _settings(ctx).db
    console = output_console()
    with console.status("running the scripted agent..."):
        run_demo(db, credits=credits, console=console)


def _finite(value: float) -> float:
    if not math.isfinite(value):  # FloatRange lets NaN through: it compares false
        msg = f"{value} is not a number of credits (0 to 1,000,000)"
        raise click.BadParameter(msg)
    return value


# -- opening a ledger ----------------------------------------------------------------------


def _ledger_path(ctx: click.Context, db_path: Path | None) -> Path:
    path = db_path or _settings(ctx).db
    if path is None:
        msg = f"no ledger given: pass --db PATH or set {DB_ENV}"
        raise ConfigError(msg)
    if not path.exists():
        msg = f"{path}: no such ledger file (read commands never create one; check --db / {DB_ENV})"
        raise ConfigError(msg)
    if not path.is_file():
        msg = f"{path}: not a file"
        raise ConfigError(msg)
    return path


@contextmanager
def _open_ledger(
    ctx: click.Context, db_path: Path | None, pricing_path: Path | None
) -> Iterator[Any]:
    """Open an existing ledger read-only, with the pricing stored in it."""
    from agent_meter.backends.sqlite import SQLiteBackend  # noqa: PLC0415
    from agent_meter.pricing import Pricing  # noqa: PLC0415

    path = _ledger_path(ctx, db_path)
    backend = SQLiteBackend(path, read_only=True)
    try:
        pricing_file = pricing_path or _settings(ctx).pricing
        if pricing_file is not None and Pricing.from_file(pricing_file) != backend.pricing:
            click.echo(
                f"note: {path} bills by the pricing stored in it, which differs from "
                f"{pricing_file}; showing the stored one",
                err=True,
            )
        yield backend
    finally:
        backend.close()


def _known_customer(backend: Any, customer_id: str) -> None:
    if customer_id not in backend.customers():
        raise CustomerNotFound(customer_id, str(backend.path))


def _since(value: str | None) -> float | None:
    """``--since``: an ISO date or time (local), or a duration back from now (``24h``)."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match:
        return time.time() - float(match[1]) * _SECONDS[match[2]]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        msg = (
            f"{value!r} is neither a date/time (2026-11-01, 2026-11-01T09:30) "
            "nor a duration (90m, 24h, 7d)"
        )
        raise click.BadParameter(msg, param_hint="--since") from None


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%m-%d %H:%M:%S")


def _call_of(event: Any) -> str:
    """The call part of a key: ``am1:cus_1::web_search:call_7:hold`` -> ``call_7:hold``.

    The customer and feature are in their own columns; ``--json`` shows the whole key.
    """
    key = event.idempotency_key or ""
    prefix = f"am1:{quote(event.customer_id, safe='')}:{quote(event.entity_id or '', safe='')}:"
    prefix += f"{quote(event.feature_id, safe='')}:"
    return key.removeprefix(prefix) if key.startswith(prefix) else key


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _check_feature(backend: Any, feature_id: str | None) -> None:
    if feature_id is not None and feature_id not in backend.pricing.features:
        known = ", ".join(sorted(backend.pricing.features))
        msg = f"unknown feature {feature_id!r}: the ledger's pricing declares {known}"
        raise ConfigError(msg)


# -- balance ----------------------------------------------------------------------------


@cli.command()
@click.argument("customer")
@_ledger_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def balance(
    ctx: click.Context,
    *,
    customer: str,
    db_path: Path | None,
    pricing_path: Path | None,
    as_json: bool,
) -> None:
    """Show what CUSTOMER has left, per credit system and feature."""
    with _open_ledger(ctx, db_path, pricing_path) as backend:
        balances = backend.balances(customer)
        pricing = backend.pricing
    if as_json:
        _echo_json({"customer_id": customer, "balances": balances})
        return
    table = Table(title=Text(f"Balances of {customer}"))
    table.add_column("balance")
    table.add_column("kind")
    table.add_column("left", justify="right")
    for balance_id, left in balances.items():
        if balance_id in pricing.credit_systems:
            kind = "credit system: " + ", ".join(sorted(pricing.credit_systems[balance_id]))
        else:
            feature = pricing.feature_type(balance_id)
            kind = feature.value if feature is not None else "?"
        shown = ("yes" if left else "no") if isinstance(left, bool) else f"{left:g}"
        table.add_row(Text(balance_id), Text(kind), shown)
    output_console().print(table)


# -- events -----------------------------------------------------------------------------


@cli.command()
@click.argument("customer")
@_ledger_options
@click.option("--since", help="Only events since a date/time (2026-11-01) or a duration (24h).")
@click.option("--feature", "feature_id", help="Only events of this feature.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the last N events.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def events(
    ctx: click.Context,
    *,
    customer: str,
    db_path: Path | None,
    pricing_path: Path | None,
    since: str | None,
    feature_id: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List CUSTOMER's ledger events: reservations, tracks, refunds (oldest first)."""
    from agent_meter.report import event_role  # noqa: PLC0415

    start = _since(since)
    with _open_ledger(ctx, db_path, pricing_path) as backend:
        _known_customer(backend, customer)
        _check_feature(backend, feature_id)
        found = backend.events(customer, since=start, feature_id=feature_id)
    if limit is not None:
        found = found[-limit:]
    if as_json:
        _echo_json([{**asdict(event), "role": event_role(event)} for event in found])
        return
    table = Table(title=Text(f"Events of {customer} ({len(found)})"))
    table.add_column("time", no_wrap=True)
    table.add_column("feature")
    table.add_column("what")
    table.add_column("units", justify="right")
    table.add_column("charged", justify="right")
    table.add_column("call", overflow="fold")
    for event in found:
        role = event_role(event)
        table.add_row(
            _when(event.at),
            Text(event.feature_id),
            role,
            f"{event.value:g}",
            Text(amount(-event.applied + 0.0, event.balance_id)),
            Text(_call_of(event)),
            style="red" if role == "denied" else ("yellow" if role == "refund" else None),
        )
    output_console().print(table)


# -- report -----------------------------------------------------------------------------


@cli.command()
@_ledger_options
@click.option(
    "--customer", "customers", multiple=True, help="Only this customer (repeat for more)."
)
@click.option("--since", help="Only usage since a date/time (2026-11-01) or a duration (24h).")
@click.option("--feature", "feature_id", help="Only this feature.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def report(
    ctx: click.Context,
    *,
    db_path: Path | None,
    pricing_path: Path | None,
    customers: tuple[str, ...],
    since: str | None,
    feature_id: str | None,
    as_json: bool,
) -> None:
    """Usage per customer and feature: units, credits, calls billed / refunded / denied."""
    from agent_meter.report import usage_report  # noqa: PLC0415

    start = _since(since)
    with _open_ledger(ctx, db_path, pricing_path) as backend:
        _check_feature(backend, feature_id)
        known = backend.customers()
        for customer in customers:
            if customer not in known:
                raise CustomerNotFound(customer, str(backend.path))
        wanted = list(customers) or known
        # Progress on stderr, and only on a terminal: stdout stays a clean table or JSON.
        progress = Progress(
            TextColumn("reading usage"),
            BarColumn(),
            MofNCompleteColumn(),
            console=output_console(stderr=True),
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        with progress:
            task = progress.add_task("customers", total=len(wanted))
            result = usage_report(
                backend,
                wanted,
                since=start,
                feature_id=feature_id,
                progress=lambda _customer: progress.advance(task),
            )
    if as_json:
        _echo_json(result.to_dict())
        return
    if not result.rows:
        click.echo("no usage recorded" + (" in that period" if start is not None else ""))
        return
    output_console().print(result.table())


# -- pricing ----------------------------------------------------------------------------


@cli.group()
def pricing() -> None:
    """Pricing files: features, credit systems, plans."""


@pricing.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the validated pricing as JSON.")
@click.pass_context
def pricing_check(ctx: click.Context, file: Path | None, as_json: bool) -> None:
    """Validate a pricing FILE (default: --pricing / AGENT_METER_PRICING); show what it defines."""
    from agent_meter.pricing import Pricing  # noqa: PLC0415

    path = file or _settings(ctx).pricing
    if path is None:
        msg = f"no pricing file given: pass FILE, --pricing FILE or set {PRICING_ENV}"
        raise ConfigError(msg)
    loaded = Pricing.from_file(path)
    counts = (
        _plural(len(loaded.features), "feature"),
        _plural(len(loaded.credit_systems), "credit system"),
        _plural(len(loaded.plans), "plan"),
    )
    if as_json:
        _echo_json({"file": str(path), "ok": True, "pricing": loaded.model_dump(mode="json")})
        return
    console = output_console()
    features = Table(title=Text(f"Features in {path}"))
    for column in ("feature", "type", "cost"):
        features.add_column(column)
    for row in loaded.describe():
        features.add_row(*(Text(cell) for cell in row))
    console.print(features)
    if loaded.plans:
        plans = Table(title="Plans")
        for column in ("plan", "auto-enabled", "resets", "grants"):
            plans.add_column(column)
        for plan_id, plan in loaded.plans.items():
            grants = ", ".join(f"{key} = {_grant(value)}" for key, value in plan.grants.items())
            plans.add_row(
                Text(plan_id), "yes" if plan.auto_enable else "no", plan.interval, Text(grants)
            )
        console.print(plans)
    click.echo(f"{path}: ok ({', '.join(counts)})")


def _grant(value: float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return f"{value:g}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; errors are one line and a non-zero exit unless --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=args, prog_name="agent-meter", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except AgentMeterError as exc:
        if "--debug" in args:
            raise
        click.echo(f"error: {exc}", err=True)
        return 1
    # With standalone_mode=False click returns ctx.exit()'s code (errors exit 1) or the
    # command's own return value (None for every command here).
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
