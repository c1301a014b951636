"""One module per `splitwise` subcommand; splitwise/cli.py maps names to them lazily."""
