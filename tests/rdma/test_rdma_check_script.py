"""bench/rdma_check.py (the hardware check) runs every step on the test double: a smoke test that
keeps the script working where no NIC exists."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rdma_check.py"


def test_the_hardware_check_passes_on_the_fake_fabric(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("rdma_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--fake", "--layers", "4", "--blocks", "32", "--requests", "3"]) == 0
    out = capsys.readouterr().out
    for step in ("devices", "auth", "transfer", "cancel", "revoke"):
        assert f"PASS  {step}" in out
    assert "5/5 passed" in out
