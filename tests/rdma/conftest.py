"""Fixtures for tests/rdma: defined in rdma_test_support.py (importable by test modules under a
unique name; `from conftest import ...` breaks when several test folders are collected together)."""

from rdma_test_support import *  # noqa: F403  (re-exports the fixtures for pytest)
