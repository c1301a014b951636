"""Test helpers shipped with the rdma package (used by tests/rdma and by hardware checks)."""

from __future__ import annotations

import pytest

from rdma.errors import NoRdmaDeviceError, PyverbsUnavailableError
from rdma.verbs import VerbsBackend


def pyverbs_backend_or_skip() -> tuple[VerbsBackend, str]:
    """The pyverbs backend and its first device with an active port, or pytest.skip with why not."""
    from rdma.pyverbs_backend import PyverbsBackend

    try:
        backend = PyverbsBackend()
        names = backend.list_devices()
    except (PyverbsUnavailableError, NoRdmaDeviceError) as exc:
        pytest.skip(f"no RDMA device for the pyverbs backend: {exc}")
    if not names:
        pytest.skip("no RDMA device with an active port (pyverbs get_device_list() found none active)")
    return backend, names[0]
