"""Sidecar.reload in memory: a fake reactor whose listening ports the test inspects, real
config files and key material in a temporary folder, connections on StringTransports."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from proxy import config as cfg
from proxy.ops.service import Sidecar
from proxy.routes.egress import Egress
from proxy.routes.ingress import Ingress
from proxy.telemetry.logs import AccessLog
from proxy.tls.throwaway import make_ca, write_ca
from proxy.wire.relay import Downstream

D1_SUBJECT = "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR"


class FakePort:
    """What the service uses of a listening port: the factory read per accept, reading."""

    def __init__(self, port: int, factory: Any) -> None:
        self.port, self.factory = port, factory
        self.reading = True
        self.connected = True
        self.stopped = False

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped, self.connected, self.reading = True, False, False
        return defer.succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def accept(self) -> Downstream:
        """A connection accepted now, as tcp.Port.doRead builds it (egress: plain)."""
        down = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(down, Downstream)
        down.makeConnection(StringTransport())
        return down


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.opened: dict[int, FakePort] = {}
        self.busy: set[int] = set()  # ports whose listen fails
        self.adopted: list[FakePort] = []  # passed sockets adopted

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.opened[port] = FakePort(port, factory)
        return self.opened[port]

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> Any:
        port = FakePort(0, factory)
        self.adopted.append(port)
        return port


class Notifier:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str | None = None) -> bool:
        self.sent.append("READY")
        return True

    def reloading(self) -> bool:
        self.sent.append("RELOADING")
        return True

    def stopping(self) -> bool:
        self.sent.append("STOPPING")
        return True


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("material")
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    client_ca.issue(D1_SUBJECT, client=True).write(d, "client")
    server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(d, "server")
    return d


def egress(name: str, port: int, extra: str = "") -> str:
    return f"""
        [[egress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        upstream = "https://127.0.0.1:9443"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        {extra}
        """


def ingress(name: str, port: int, allow: str = '["CN=a.example"]') -> str:
    return f"""
        [[ingress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        server_cert = "server.pem"
        server_key = "server.key"
        client_ca = "client-ca.pem"
        allow_subjects = {allow}
        upstream = "http://127.0.0.1:9000"
        """


HEAD = """
    [service]
    reload_interval = 0
    drain_timeout = 5
    """


def write(material: Path, *parts: str, head: str = HEAD) -> Path:
    path = material / "sidecar.toml"
    path.write_text(textwrap.dedent(head) + "".join(textwrap.dedent(p) for p in parts))
    return path


def running(
    material: Path, *parts: str, head: str = HEAD, inherited: dict[str, list[int]] | None = None
) -> tuple[Sidecar, Reactor, Notifier]:
    reactor, notifier = Reactor(), Notifier()
    config = cfg.load(write(material, *parts, head=head))
    sidecar = Sidecar(config, reactor, access_log=AccessLog(None, False), notifier=notifier)
    sidecar.build()
    sidecar.start(inherited)
    return sidecar, reactor, notifier


def metric(sidecar: Sidecar, name: str, **labels: str) -> float | None:
    value: float | None = sidecar.metrics.registry.get_sample_value(name, labels)
    return value


def wrapped_route(port: FakePort) -> Any:
    factory = port.factory
    return getattr(factory, "wrappedFactory", factory).route


def test_a_reload_without_change_keeps_every_route_listener_and_counter(material: Path) -> None:
    parts = (egress("out", 18001), ingress("in", 18002))
    sidecar, reactor, notifier = running(material, *parts)
    states = list(sidecar.routes)
    routes = [s.route for s in states]
    factories = [p.factory for p in reactor.opened.values()]
    stats = list(sidecar.metrics.routes)
    assert sidecar.reload()
    assert sidecar.routes == states and [s.route for s in sidecar.routes] == routes
    assert [p.factory for p in reactor.opened.values()] == factories  # nothing swapped
    assert len(reactor.opened) == 2 and not any(p.stopped for p in reactor.opened.values())
    assert sidecar.metrics.routes == stats
    assert [len(pools) for pools in sidecar._pools.values()] == [1, 1]
    assert sidecar._retiring == []
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="success") == 1.0
    assert notifier.sent[-2:] == ["RELOADING", "READY"]


def test_a_changed_rule_rebuilds_the_route_on_the_listener_it_had(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    old = sidecar.routes[1]
    port = reactor.opened[18002]
    old_stats = old.route.stats
    write(material, egress("out", 18001), ingress("in", 18002, '["CN=*.example"]'))
    assert sidecar.reload()
    new = sidecar.routes[1]
    assert isinstance(new.route, Ingress) and new.route is not old.route
    assert new.route.config.allow_subjects == ("CN=*.example",)
    assert new.port is port and not port.stopped and port.reading
    assert wrapped_route(port) is new.route  # new connections: the new route, over TLS
    assert port.factory.wrappedFactory is not None
    assert new.route.listener is port and old.route.listener is None and old.port is None
    assert old.route.draining and [r.state for r in sidecar._retiring] == [old]
    # the egress route did not change: untouched
    assert sidecar.routes[0].route is wrapped_route(reactor.opened[18001])
    # one request counter per route, counting on
    assert new.route.stats is old_stats
    assert [(s.route, s.direction) for s in sidecar.metrics.routes] == [
        ("out", "egress"),
        ("in", "ingress"),
    ]
    assert sidecar.readiness() == []
    assert sidecar.status()["config"]["ingress"][0]["allow_subjects"] == ["CN=*.example"]


def test_added_and_removed_routes_open_and_close_their_listeners(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("a", 18001), ingress("in", 18002))
    write(material, egress("b", 18003), ingress("in", 18002))
    assert sidecar.reload()
    assert reactor.opened[18001].stopped
    assert wrapped_route(reactor.opened[18003]).name == "b"
    assert [s.config.name for s in sidecar.routes] == ["b", "in"]
    assert [r["name"] for r in sidecar.status()["routes"]] == ["b", "in"]
    assert sidecar.readiness() == []
    # a route renamed on the same address takes the listener over
    write(material, egress("c", 18003), ingress("in", 18002))
    assert sidecar.reload()
    assert not reactor.opened[18003].stopped
    assert wrapped_route(reactor.opened[18003]).name == "c"


def test_an_invalid_config_changes_nothing_and_is_counted(material: Path) -> None:
    sidecar, _, notifier = running(material, egress("out", 18001), ingress("in", 18002))
    states = list(sidecar.routes)
    config = sidecar.config
    path = write(material, egress("out", 18001, "colour = 1"), ingress("in", 18002))
    with capturedLogs() as logs:
        assert not sidecar.reload()
    assert sidecar.routes == states and sidecar.config is config
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="failure") == 1.0
    assert notifier.sent[-2:] == ["RELOADING", "READY"]
    errors = [e for e in logs if "reload failed" in e.get("log_format", "")]
    assert len(errors) == 1
    assert errors[0]["reason"] == f"{path}: egress[0] (out).colour: unknown key"


def test_a_listener_that_cannot_open_undoes_the_whole_reload(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    states, stats = list(sidecar.routes), list(sidecar.metrics.routes)
    reactor.busy.add(18004)
    write(material, egress("out", 18001), egress("b", 18003), egress("c", 18004),
          ingress("in", 18002, '["CN=*"]'))  # fmt: skip
    with capturedLogs() as logs:
        assert not sidecar.reload()
    assert reactor.opened[18003].stopped  # opened for b, closed again
    assert sidecar.routes == states and sidecar.metrics.routes == stats
    assert wrapped_route(reactor.opened[18002]) is states[1].route
    assert "b" not in sidecar._pools or sidecar._pools["b"] == []
    reason = next(e["reason"] for e in logs if "reload failed" in e.get("log_format", ""))
    assert "egress[c].listen 127.0.0.1:18004: cannot listen" in reason


def test_replaced_connections_finish_their_exchange_and_the_old_route_closes(
    material: Path,
) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    port = reactor.opened[18001]
    old = sidecar.routes[0]
    forbidden = b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
    fresh = port.accept()  # accepted, first request not in yet
    idle = port.accept()  # keep-alive, between requests
    idle.dataReceived(forbidden)
    assert b"403" in idle.transport.value() and not idle.transport.disconnecting
    busy = port.accept()  # a request head half in
    busy.dataReceived(b"GET http://elsewhere.example/ HTTP/1.1\r\nHo")
    write(material, egress("out", 18001, "max_connection_age = 30"), ingress("in", 18002))
    assert sidecar.reload()
    assert wrapped_route(port) is sidecar.routes[0].route is not old.route
    assert idle.transport.disconnecting  # closed at once
    assert not fresh.transport.disconnecting and not busy.transport.disconnecting
    for down in (fresh, busy):  # answered by the route they were accepted by, then closed
        down.transport.clear()
        if down is fresh:
            down.dataReceived(forbidden)
        else:
            down.dataReceived(b"st: elsewhere.example\r\n\r\n")
        answer = down.transport.value()
        assert answer.startswith(b"HTTP/1.1 403") and b"Connection: close" in answer
        assert down.transport.disconnecting
    assert all(d.route is old.route for d in (fresh, idle, busy))
    # new connections go to the new route
    assert port.accept().route is sidecar.routes[0].route
    for down in (fresh, idle, busy):
        down.connectionLost(Failure(ConnectionDone()))
    reactor.advance(0.25)  # the connections are gone: idle upstream connections close
    assert [r.state for r in sidecar._retiring] == [old]
    reactor.advance(0.25)  # no upstream connection left: the pool is closed, the route gone
    assert sidecar._retiring == []
    assert sidecar._pools["out"] == [sidecar.routes[0].route.pool]


def test_a_replaced_route_past_drain_timeout_is_cut(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    down = reactor.opened[18001].accept()
    down.dataReceived(b"GET http://elsewhere.example/ HTTP/1.1\r\nHo")  # and nothing more
    write(material, egress("out", 18001, "max_connection_age = 30"), ingress("in", 18002))
    assert sidecar.reload()
    reactor.advance(4.75)
    assert not down.transport.disconnecting  # drain_timeout is 5 s
    reactor.pump([0.25] * 30)
    assert down.transport.disconnecting and sidecar._retiring == []


def test_a_listener_paused_at_max_connections_resumes_for_the_new_route(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001, "max_connections = 1"),
                                  ingress("in", 18002))  # fmt: skip
    port = reactor.opened[18001]
    port.accept()
    assert not port.reading and sidecar.routes[0].route.accept_paused
    write(material, egress("out", 18001, "max_connections = 2"), ingress("in", 18002))
    assert sidecar.reload()
    assert port.reading and sidecar.routes[0].route.listener is port


def test_keys_read_at_start_only_keep_their_running_value_and_are_named(material: Path) -> None:
    head = HEAD + '[admin]\nlisten = "127.0.0.1:18009"\n[log]\nformat = "json"\n'
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002), head=head)
    new_head = HEAD.replace("drain_timeout = 5", "drain_timeout = 7")
    new_head += '[admin]\nlisten = "127.0.0.1:18010"\n[log]\nformat = "text"\naccess = false\n'
    write(material, egress("out", 18001), ingress("in", 18002), head=new_head)
    with capturedLogs() as logs:
        assert sidecar.reload()
    assert sidecar.config.admin == cfg.AdminConfig(cfg.Listen("tcp", "127.0.0.1", 18009))
    assert sidecar.config.service.log_format == "json"
    assert sidecar.config.service.drain_timeout == 7.0  # live
    assert sidecar.config.service.access_log is False and not sidecar.access_log.enabled
    assert 18010 not in reactor.opened
    warning = next(e for e in logs if "read at start only" in e.get("log_format", ""))
    assert warning["keys"] == "admin.listen, log.format"


def test_the_file_watch_reloads_a_changed_config_once(material: Path) -> None:
    head = HEAD.replace("reload_interval = 0", "reload_interval = 1")
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002), head=head)
    reactor.advance(1)
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="success") == 0.0
    write(material, egress("out", 18001), ingress("in", 18002, '["CN=b.example"]'), head=head)
    reactor.advance(1)
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="success") == 1.0
    assert sidecar.routes[1].route.config.allow_subjects == ("CN=b.example",)
    # broken: refused once, not again until the file changes
    write(material, egress("out", 18001, "colour = 1"), ingress("in", 18002), head=head)
    reactor.advance(1)
    reactor.advance(1)
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="failure") == 1.0
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="success") == 1.0


def test_a_rebuilt_egress_route_shares_its_client_tls(material: Path) -> None:
    sidecar, _, _ = running(material, egress("out", 18001), ingress("in", 18002))
    old = sidecar.routes[0]
    write(material, egress("out", 18001, "max_connection_age = 30"), ingress("in", 18002))
    assert sidecar.reload()
    new = sidecar.routes[0]
    assert isinstance(new.route, Egress) and new.route is not old.route
    assert new.client_tls is old.client_tls and new.route.pool is not old.route.pool
    assert new.route.pool.tls is old.client_tls


def test_a_passed_socket_is_adopted_by_a_reload_and_parked_when_no_route_uses_it(
    material: Path,
) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        fd = os.dup(listening.fileno())
        base = (egress("out", 18001), ingress("in", 18002))
        sidecar, reactor, _ = running(material, *base, inherited={"extra": [fd]})
        assert reactor.adopted == []  # no route names it yet
        extra = egress("x", 0).replace('"127.0.0.1:0"', '"systemd:extra"')
        write(material, *base, extra)
        assert sidecar.reload()
        [port] = reactor.adopted
        assert wrapped_route(port).name == "x"
        write(material, *base)
        assert sidecar.reload()
        assert not port.stopped and not port.reading  # parked, not closed
        assert sidecar.readiness() == []
        write(material, *base, extra.replace('name = "x"', 'name = "y"'))
        assert sidecar.reload()
        assert reactor.adopted == [port] and port.reading and wrapped_route(port).name == "y"
