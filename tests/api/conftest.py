"""Fixtures for tests/api: defined in api_support.py (importable by test modules under a unique
name; `from conftest import ...` breaks when several test folders are collected together)."""

from api_support import *  # noqa: F403  (re-exports the fixtures for pytest)
from conformance_support import clusters, tokenizer  # noqa: F401  (package-scoped: both conformance modules share them)
