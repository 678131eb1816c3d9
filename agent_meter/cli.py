"""The ``agent-meter`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent_meter.errors import AgentMeterError

__all__ = ["main"]


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """agent_meter: a billing guard in front of every tool an LLM agent can call."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--db", type=click.Path(path_type=Path), help="Keep the demo ledger in this file.")
@click.option("--credits", default=7.0, show_default=True, help="Credits the customer starts with.")
def demo(db: Path | None, credits: float) -> None:
    """Run a scripted, offline agent on the embedded backend."""
    from agent_meter.demo import run_demo  # noqa: PLC0415 - keeps --help fast

    run_demo(db, credits=credits)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; errors are one line and a non-zero exit unless --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="agent-meter", standalone_mode=False)
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
