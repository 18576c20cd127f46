"""The `eas` command line. Each subcommand lives next to the code it drives; this file only wires them.

`eas --help` and every argument check must stay fast, so the modules in `COMMANDS` import nothing but
typer and the standard library at module level: torch, transformers, the service and the model store are
imported inside the command functions, when a command actually runs (tests/tools/cli/test_help.py checks that
importing this module pulls in none of them). A new subcommand is one more `COMMANDS` row.

Usage errors (a missing option, a value of the wrong type) are printed as one line, `error: ...`, with
exit code 2, like the commands' own refusals (eas_tools/common.py).
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any

import typer
from typer.core import TyperGroup

# Recent typers vendor click (typer._click), older ones use the click package: take the exception classes
# from whichever package typer's group class comes from, or they would not match what it raises.
click_errors = import_module(TyperGroup.__mro__[1].__module__.rpartition(".")[0] + ".exceptions")

# name -> "module:function"; the order is the order of `eas --help`.
COMMANDS: dict[str, str] = {
    "serve": "eas_tools.commands.serve:serve",
    "import": "eas_tools.commands.import_checkpoint:import_command",
    "convert": "eas_tools.commands.convert:convert_command",
    "eval": "eas_tools.commands.evaluate:eval_command",
    "bench": "eas_tools.commands.bench:bench_command",
    "compare": "eas_tools.bench.compare:compare_command",
    "train-default": "eas_tools.commands.train_default:train_default_command",
}


class OneLineErrors(TyperGroup):
    """A typer group whose usage errors are one `error:` line (exit 2) instead of a usage box."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # registration order, not alphabetical

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name or "eas", complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:  # plain `eas`: the help text, as before
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            if not standalone_mode:
                raise
            where = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) is not None else ""
            typer.secho(f"error: {where}{' '.join(exc.format_message().split())}", fg=typer.colors.RED, err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("aborted", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False,
                  help="eas-serve: EAS attention skipping for VLMs")


@app.callback()
def main() -> None:
    """Efficient Attention Skipping: import, convert, evaluate and serve vision-language models."""


for _name, _target in COMMANDS.items():
    _module, _, _function = _target.partition(":")
    app.command(_name)(getattr(import_module(_module), _function))


if __name__ == "__main__":  # `python -m eas_tools.cli`, the same as the `eas` script
    app(prog_name="eas")
