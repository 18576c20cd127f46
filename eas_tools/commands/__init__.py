"""One module per `eas` subcommand: the typer function and its argument checks (heavy imports inside)."""
