"""Module entry points (`python -m splitwise.entrypoints.api_server`)."""
