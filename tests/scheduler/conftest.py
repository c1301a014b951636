"""Fixtures for tests/scheduler: defined in scheduler_support.py (importable by test modules under a unique
name; `from conftest import ...` breaks when several test folders are collected together)."""

from scheduler_support import *  # noqa: F403  (re-exports the fixtures for pytest)
