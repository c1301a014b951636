"""The `splitwise` console script: one click group, one module per command under splitwise/commands/.

This is the process's single error boundary for CLI commands: expected errors (ours, with a clear
message) are printed without a traceback and exit 1; click's usage errors exit 2 naming the flag.
"""

from __future__ import annotations

import importlib
import sys

import click

from splitwise.logging import configure_logging

# command name -> "module:attribute". Imported lazily so `splitwise --help` does not import torch.
COMMANDS: dict[str, str] = {
    "make-tiny-model": "splitwise.commands.make_tiny_model:make_tiny_model",
    "generate": "splitwise.commands.generate:generate",
    "serve": "splitwise.commands.serve:serve",
    "up": "splitwise.commands.up:up",
    "router": "splitwise.commands.router:router",
    "planner": "splitwise.commands.planner:planner",
    "inspect": "splitwise.commands.inspect:inspect_cmd",
    "drain": "splitwise.commands.drain:drain",
    "role": "splitwise.commands.role:role",
    "bench": "splitwise.commands.bench:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command: click.Command | None = getattr(module, attr)
        return command


@click.group(cls=LazyGroup)
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.version_option(package_name="splitwise")
def cli(log_level: str) -> None:
    """splitwise: prefill/decode disaggregated LLM serving."""
    try:
        configure_logging(log_level)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from None


def main() -> None:
    from splitwise.errors import SplitwiseError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # One line per problem, naming the flag (no usage banner: `--help` has it).
        for line in exc.format_message().splitlines():
            click.echo(f"error: {line}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SplitwiseError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
