"""How the P/D flows run a blocking call (a transport's connect, wait, forget or revoke) off the
event loop: in the loop's default executor. Tests inject an ``Offload`` that runs it inline or
step by step."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


def run_in_executor(fn: Callable[[], T]) -> Awaitable[T]:
    return asyncio.get_running_loop().run_in_executor(None, fn)
