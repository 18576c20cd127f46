"""The `eas` command line. Each subcommand lives next to the code it drives; this file only wires them."""

from __future__ import annotations

import typer

from eas.bench.cli import bench_command
from eas.conversion.cli import convert_command
from eas.demo.cli import train_default_command
from eas.evaluation.cli import eval_command
from service.cli import serve

app = typer.Typer(no_args_is_help=True, add_completion=False, help="eas-serve: EAS attention skipping for VLMs")


@app.callback()
def main() -> None:
    """Efficient Attention Skipping: convert, evaluate and serve vision-language models."""


app.command("serve")(serve)
app.command("convert")(convert_command)
app.command("eval")(eval_command)
app.command("train-default")(train_default_command)
app.command("bench")(bench_command)
