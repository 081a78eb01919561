"""systemd integration without libsystemd: sd_notify(3), the watchdog, sd_listen_fds(3).

Everything the process reads from outside (environment, pid, clock, sockets) is a parameter,
so tests run in memory; the defaults are the real ones.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Protocol

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

__all__ = [
    "LISTEN_FDS_START",
    "Notifier",
    "adopt_listener",
    "listen_fds",
    "watchdog_interval",
]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: systemd passes sockets from fd 3 upwards
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _monotonic_ns() -> int:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _notify_address(value: str) -> bytes | None:
    """NOTIFY_SOCKET -> sendto() address: '/path' as is, '@name' in the abstract namespace."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


class Notifier:
    """Tells the service manager about state changes (sd_notify(3)).

    ``NOTIFY_SOCKET`` is read once, here. Without it (not started by systemd, or
    ``Type=`` other than notify) every call is a no-op that returns False. Sending never
    raises: a lost notification must not take traffic down; the first failure is logged.

    Reload protocol: call ``reloading()`` when a reload starts and ``ready()`` when it is
    done, whatever its outcome; systemd keeps the unit in "reloading" until READY=1.
    """

    log = Logger()

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        socket_factory: Callable[[], socket.socket] = _notify_socket,
        monotonic_ns: Callable[[], int] = _monotonic_ns,
    ) -> None:
        env = os.environ if environ is None else environ
        self._socket_factory = socket_factory
        self._monotonic_ns = monotonic_ns
        self._failed = False
        value = env.get("NOTIFY_SOCKET", "")
        self._address = _notify_address(value) if value else None
        if value and self._address is None:
            self.log.warn(
                "NOTIFY_SOCKET={value!r} is neither a path nor an @abstract name; "
                "systemd notifications disabled",
                value=value,
            )

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when the datagram was sent."""
        if self._address is None or not fields:
            return False
        # A newline inside a value would start a new, forged assignment.
        payload = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        ).encode("utf-8")
        try:
            with self._socket_factory() as sock:
                sock.sendto(payload, self._address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.warn(
                    "cannot notify systemd at {address!r}: {error}; further failures not logged",
                    address=self._address,
                    error=os.strerror(e.errno) if e.errno else str(e),
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: listeners are open and serving."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """A reload starts. MONOTONIC_USEC is required by Type=notify-reload (systemd 253+)
        and ignored by older managers."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic_ns() // 1000)

    def stopping(self) -> bool:
        """Shutdown started: no new connections, draining the open ones."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """Keep-alive for WatchdogSec=; see watchdog_interval() for the cadence."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """Free-form line shown by ``systemctl status``."""
        return self.notify(STATUS=text)


def watchdog_interval(
    environ: Mapping[str, str] | None = None,
    getpid: Callable[[], int] = os.getpid,
) -> float | None:
    """The watchdog timeout in seconds (sd_watchdog_enabled(3)), or None when it is off.

    systemd kills the service when no WATCHDOG=1 arrives within this time; the caller pings
    at half of it, so one late tick of a busy reactor does not cost a restart.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != getpid():
                return None  # meant for another process, e.g. our parent
        except ValueError:
            return None
    return usec / 1_000_000


def _set_cloexec(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    getpid: Callable[[], int] = os.getpid,
    *,
    unset: bool = False,
    set_cloexec: Callable[[int], None] = _set_cloexec,
) -> dict[str, list[int]]:
    """Sockets passed by socket activation, by FileDescriptorName= (sd_listen_fds_with_names(3)).

    Returns {} when nothing was passed to this process (no LISTEN_PID, or another pid's).
    Fds are numbered from 3; a socket without a name is filed under "unknown"; several sockets
    may share a name (e.g. an IPv4 and an IPv6 ListenStream= of one .socket unit). Each fd is
    made close-on-exec. ``unset=True`` removes the LISTEN_* variables from ``environ``
    (in every outcome, as libsystemd does) so child processes do not claim them.

    Raises ValueError when the variables are malformed.
    """
    env = os.environ if environ is None else environ
    try:
        return _listen_fds(env, getpid, set_cloexec)
    finally:
        if unset:
            for name in _LISTEN_VARS:
                env.pop(name, None)


def _listen_fds(
    env: Mapping[str, str], getpid: Callable[[], int], set_cloexec: Callable[[int], None]
) -> dict[str, list[int]]:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return {}
    try:
        pid = int(pid_text)
    except ValueError:
        raise ValueError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if pid != getpid():
        return {}
    count_text = env.get("LISTEN_FDS", "0")
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count_text!r} is negative")
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else []
    if len(names) > count:
        raise ValueError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS={count}")
    result: dict[str, list[int]] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        set_cloexec(fd)
        name = names[index] if index < len(names) and names[index] else "unknown"
        result.setdefault(name, []).append(fd)
    return result


class _AdoptsStreamPorts(Protocol):
    """The part of IReactorSocket that adopt_listener() needs."""

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: socket.AddressFamily, factory: Factory
    ) -> IListeningPort: ...


def adopt_listener(reactor: _AdoptsStreamPorts, fd: int, factory: Factory) -> IListeningPort:
    """Serve ``factory`` on an inherited listening socket, then close ``fd``.

    The reactor keeps its own duplicate (IReactorSocket.adoptStreamPort does not take
    ownership), so ours is closed once the port exists; systemd still holds the socket, which
    is why connections queue rather than fail while the service restarts. On error ``fd`` is
    left open for the caller.
    """
    sock = socket.socket(fileno=fd)  # family and type read from the kernel
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"fd {fd} is not a stream socket ({sock.type!r})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"fd {fd} is not a listening socket")
        family = socket.AddressFamily(sock.family)
        # The reactor requires a non-blocking socket; systemd passes blocking ones.
        sock.setblocking(False)
    finally:
        sock.detach()
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    return port
