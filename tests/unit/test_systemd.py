"""sd_notify, watchdog and socket activation, against real local sockets and MemoryReactor."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs

from proxy.ops.systemd import Notifier, adopt_listener, listen_fds, watchdog_interval


@pytest.fixture
def path_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, socket.socket]]:
    # mktemp() keeps the path well under the 108-byte sun_path limit.
    path = tmp_path_factory.mktemp("sd") / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    with sock:
        yield str(path), sock


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    name = f"mtls-sidecar-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    with sock:
        yield "@" + name, sock


def test_notifier_sends_ready_and_status_to_path_socket(
    path_receiver: tuple[str, socket.socket],
) -> None:
    address, sock = path_receiver
    notifier = Notifier({"NOTIFY_SOCKET": address})

    assert notifier.enabled
    assert notifier.ready("serving 2 routes")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 routes"
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_notifier_reaches_abstract_namespace_socket(
    abstract_receiver: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_receiver
    notifier = Notifier({"NOTIFY_SOCKET": address})

    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("draining 3 connections")
    assert sock.recv(4096) == b"STATUS=draining 3 connections"


def test_notifier_reloading_carries_monotonic_usec_from_clock(
    path_receiver: tuple[str, socket.socket],
) -> None:
    address, sock = path_receiver
    notifier = Notifier({"NOTIFY_SOCKET": address}, monotonic_ns=lambda: 1_234_567_890_123)

    assert notifier.reloading()
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=1234567890"


def test_notifier_default_clock_is_clock_monotonic(
    path_receiver: tuple[str, socket.socket],
) -> None:
    address, sock = path_receiver
    before = time_usec()
    Notifier({"NOTIFY_SOCKET": address}).reloading()
    after = time_usec()

    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def time_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notifier_newline_in_value_cannot_forge_a_field(
    path_receiver: tuple[str, socket.socket],
) -> None:
    address, sock = path_receiver
    Notifier({"NOTIFY_SOCKET": address}).status("bad file\nREADY=1")

    assert sock.recv(4096) == b"STATUS=bad file READY=1"


def test_notifier_without_notify_socket_is_a_noop() -> None:
    def no_socket() -> socket.socket:
        raise AssertionError("no socket may be opened")

    notifier = Notifier({}, socket_factory=no_socket)

    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.reloading()
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_notifier_ignores_unsupported_notify_socket_value() -> None:
    with capturedLogs() as events:
        notifier = Notifier({"NOTIFY_SOCKET": "relative/path"})

    assert not notifier.enabled
    assert not notifier.ready()
    assert len(events) == 1


def test_notifier_send_failure_returns_false_and_logs_once(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})

    with capturedLogs() as events:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert not notifier.stopping()

    assert len(events) == 1
    assert "nobody-listens" in str(events[0]["address"])


def test_notifier_survives_socket_factory_failure() -> None:
    def broken() -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    with capturedLogs() as events:
        assert not Notifier({"NOTIFY_SOCKET": "/run/systemd/notify"}, socket_factory=broken).ready()
    assert len(events) == 1


# ----------------------------------------------------------------------------- watchdog
@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, getpid=lambda: 4242) == expected


# ----------------------------------------------------------------------------- listen_fds
class CloexecRecorder:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def __call__(self, fd: int) -> None:
        self.fds.append(fd)


def test_listen_fds_maps_names_to_fds_from_3() -> None:
    cloexec = CloexecRecorder()
    environ = {
        "LISTEN_PID": "4242",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "d1-callbacks:d1-callbacks:admin",
    }

    fds = listen_fds(environ, lambda: 4242, set_cloexec=cloexec)

    assert fds == {"d1-callbacks": [3, 4], "admin": [5]}
    assert cloexec.fds == [3, 4, 5]
    assert environ["LISTEN_FDS"] == "3"  # left alone without unset=True


def test_listen_fds_without_names_files_sockets_under_unknown() -> None:
    fds = listen_fds(
        {"LISTEN_PID": "7", "LISTEN_FDS": "2"}, lambda: 7, set_cloexec=CloexecRecorder()
    )

    assert fds == {"unknown": [3, 4]}


def test_listen_fds_unnamed_entries_are_unknown() -> None:
    environ = {"LISTEN_PID": "7", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a::"}

    assert listen_fds(environ, lambda: 7, set_cloexec=CloexecRecorder()) == {
        "a": [3],
        "unknown": [4, 5],
    }


def test_listen_fds_for_another_pid_returns_nothing() -> None:
    cloexec = CloexecRecorder()
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "d1-callbacks"}

    assert listen_fds(environ, lambda: 4242, set_cloexec=cloexec) == {}
    assert cloexec.fds == []


def test_listen_fds_without_listen_pid_returns_nothing() -> None:
    assert listen_fds({"LISTEN_FDS": "1"}, lambda: 1, set_cloexec=CloexecRecorder()) == {}


def test_listen_fds_unset_removes_variables_so_children_do_not_inherit_them() -> None:
    environ = {
        "LISTEN_PID": "9",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "d1-callbacks",
        "PATH": "/usr/bin",
    }

    assert listen_fds(environ, lambda: 9, unset=True, set_cloexec=CloexecRecorder()) == {
        "d1-callbacks": [3]
    }
    assert environ == {"PATH": "/usr/bin"}


def test_listen_fds_unset_applies_even_when_meant_for_another_pid() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}

    assert listen_fds(environ, lambda: 9, unset=True, set_cloexec=CloexecRecorder()) == {}
    assert environ == {}


@pytest.mark.parametrize(
    "environ",
    [
        {"LISTEN_PID": "abc", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "9", "LISTEN_FDS": "one"},
        {"LISTEN_PID": "9", "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "9", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
    ],
)
def test_listen_fds_rejects_malformed_environment(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="LISTEN_"):
        listen_fds(environ, lambda: 9, set_cloexec=CloexecRecorder())


def test_listen_fds_sets_close_on_exec_on_real_fds() -> None:
    # fds 3.. belong to pytest here, so the real helper is checked through a child process.
    code = (
        "import fcntl, os, socket\n"
        "from proxy.ops.systemd import listen_fds\n"
        "env = {'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': '1', 'LISTEN_FDNAMES': 'x'}\n"
        "assert not fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC\n"
        "assert listen_fds(env) == {'x': [3]}\n"
        "assert fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC\n"
    )
    with socket.socket() as sock:
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        # dup2 onto 3 in the child only; the parent keeps its own table intact.
        result = subprocess.run(
            [sys.executable, "-c", f"import os; os.dup2({fd}, 3, inheritable=True)\n{code}"],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
            check=False,
        )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- adopt_listener
def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_adopt_listener_passes_family_and_closes_our_fd(
    family: socket.AddressFamily, host: str
) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    reactor = MemoryReactor()
    factory = protocol.ServerFactory()
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        try:
            listener.bind((host, 0))
        except OSError as e:
            pytest.skip(f"cannot bind {host}: {e}")
        listener.listen()
        fd = os.dup(listener.fileno())  # what systemd's fd 3 would be

        port = adopt_listener(reactor, fd, factory)

        assert reactor.adoptedPorts == [(fd, family, factory)]
        assert port is not None
        assert not is_open(fd)
        assert fcntl.fcntl(listener.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_adopt_listener_refuses_a_socket_that_is_not_listening() -> None:
    reactor = MemoryReactor()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="not a listening socket"):
            adopt_listener(reactor, sock.fileno(), protocol.ServerFactory())
        assert is_open(sock.fileno())
    assert reactor.adoptedPorts == []


def test_adopt_listener_refuses_a_datagram_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="not a stream socket"):
            adopt_listener(MemoryReactor(), sock.fileno(), protocol.ServerFactory())
        assert is_open(sock.fileno())


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@pytest.mark.integration
def test_adopt_listener_serves_connections_on_a_real_reactor() -> None:
    from twisted.internet.selectreactor import SelectReactor

    reactor = SelectReactor()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    fd = os.dup(listener.fileno())
    listener.close()  # the adopted duplicate alone keeps the socket listening

    port = adopt_listener(reactor, fd, protocol.Factory.forProtocol(Echo))
    try:
        assert not is_open(fd)
        # A blocking listener would hang the reactor in accept(); fail instead.
        assert fcntl.fcntl(port.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # type: ignore[attr-defined]
        with socket.create_connection(address, timeout=5) as client:
            client.setblocking(False)
            client.sendall(b"ping")
            received = b""
            for _ in range(200):
                reactor.iterate(0.01)
                try:
                    received += client.recv(16)
                except BlockingIOError:
                    continue
                if received == b"ping":
                    break
        assert received == b"ping"
    finally:
        port.stopListening()
        reactor.iterate(0)
        reactor.disconnectAll()
        reactor.waker.connectionLost(None)  # type: ignore[attr-defined]
