"""Start-up failures of `splitwise serve` as one line naming the flag to change.

An instance that cannot start (a taken port, Redis unreachable or refusing the password, a model
directory that does not load, a transfer protocol without its device, a context longer than the
model's) exits 1 with ``error: <flag>: <what is wrong>``; only a failure we do not recognise keeps
its traceback (it is a bug to report).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

from splitwise.errors import SplitwiseError


class StartupError(SplitwiseError):
    """The instance cannot start; the message names the flag (printed by the CLI's error boundary)."""


def check_ports_free(config: Any) -> None:
    """Bind each explicitly chosen listener port once, so a taken one is reported by its flag
    before the model loads (minutes on a real checkpoint)."""
    ports = [("--port", config.port), ("--metrics-port", config.metrics_port)]
    if config.role != "mixed":
        ports.append(("--pd-comm-port", config.pd_comm_port))
    if config.role == "decode" and "tcp" in config.cache_transfer_protocols:
        ports.append(("--kv-transfer-port", config.kv_transfer_port))
    seen: dict[int, str] = {}
    for flag, port in ports:
        if not port:
            continue
        if port in seen:
            raise StartupError(f"{flag} {port}: the same port as {seen[port]}")
        seen[port] = flag
        _probe_bind(config.host, port, flag)


def _probe_bind(host: str, port: int, flag: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listener binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(_bind_error(host, port, flag, exc)) from None


def _bind_error(host: str, port: int, flag: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{flag} {port}: {host}:{port} is already in use (another server?); choose another port, or 0 for a free one"
    if exc.errno == errno.EACCES:
        return f"{flag} {port}: permission denied (ports below 1024 need root)"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return f"--host {host}: not an address of this machine ({exc.strerror or exc})"
    return f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc})"


def explain_startup_error(exc: BaseException, config: Any) -> str | None:
    """One line naming the flag for a start-up failure we recognise, else None."""
    import redis.exceptions as redis_errors

    from scheduler.errors import SchedulerConnectionError
    from splitwise.engine.errors import ModelLoadError

    sched = config.scheduler
    where = f"Redis at {sched.scheduler_host}:{sched.scheduler_port}"
    for cause in _chain(exc):
        text = str(cause)
        if _is_auth_error(cause, redis_errors):
            return f"--scheduler-password: {where} refused the credentials ({text})"
        if isinstance(
            cause, (redis_errors.ConnectionError, redis_errors.TimeoutError, SchedulerConnectionError)
        ):
            return f"--scheduler-host/--scheduler-port: cannot reach {where} ({text})"
        if isinstance(cause, ModelLoadError):
            return text if text.startswith("--model") else f"--model {config.engine.model}: {text}"
        if isinstance(cause, ValueError) and text.startswith("--"):
            return text
        if isinstance(cause, OSError) and cause.errno in (
            errno.EADDRINUSE,
            errno.EACCES,
            errno.EADDRNOTAVAIL,
        ):
            return _bind_error(config.host, 0, "a listener port", cause)
    return None


def _is_auth_error(exc: BaseException, redis_errors: Any) -> bool:
    if isinstance(exc, redis_errors.AuthenticationError):
        return True
    text = str(exc)
    if isinstance(exc, redis_errors.ResponseError):
        return (
            text.startswith(("NOAUTH", "WRONGPASS", "invalid password")) or "AUTH" in text.split(" ", 2)[:2]
        )
    return isinstance(exc, SplitwiseError) and ("NOAUTH" in text or "WRONGPASS" in text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
