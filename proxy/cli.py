"""Command line: argv -> the commands of the product."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs

ERROR_PREFIX = "mtls-sidecar: error:"  # every failure the CLI itself prints starts with it


class _Parser(argparse.ArgumentParser):
    """argparse with the product's one error prefix, after the usage line of the (sub)command
    that was mistyped; exit status 2 as argparse's own."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{ERROR_PREFIX} {message}\n")


class _CommandParser(_Parser):
    """A subcommand's parser. argparse hands a subcommand's unknown arguments up to the
    top-level parser, whose usage line says nothing about the subcommand: refuse them here."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _run(args: argparse.Namespace) -> int:
    from proxy.ops.systemd import listen_fds

    # first: importing twisted.internet.endpoints (twisted.web.client does) consumes LISTEN_*
    environ = dict(os.environ)
    inherited = listen_fds(os.environ, os.getpid, unset=True)

    from proxy.wire.reactor import install

    install()  # before the first import of the global reactor
    from twisted.internet import reactor

    from proxy import config as cfg
    from proxy.ops.service import Sidecar, install_signal_handlers
    from proxy.ops.systemd import Notifier
    from proxy.telemetry.logs import start_logging, startup_error
    from proxy.tls import contexts as tls

    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as e:
        fmt = _log_format(args.config)
        for f in e.findings:
            _finding(fmt, f)
        return 2
    from proxy.ops import audit

    fmt = config.service.log_format
    # what `check` calls a mistake stops `run` too; a lapsed certificate takes its route down
    findings = audit.audit(config, running=True)
    problems = audit.mistakes(findings)
    if problems:
        for f in problems:
            _finding(fmt, f)
        return 2
    from proxy.ops import worker

    if config.service.supervised() and not worker.is_worker(environ):
        from proxy.ops.supervisor import run_supervisor

        raise_fd_limit()
        return run_supervisor(config, inherited, environ, args.log_level, findings)
    notifier = Notifier(environ)
    channel = None
    if worker.is_worker(environ):
        reactor.shared_listeners = True  # type: ignore[attr-defined]
        channel = _worker_channel(reactor, environ, inherited)
        # the supervisor serves the admin listener and watches the files
        config = attrs.evolve(
            config, admin=None, service=attrs.evolve(config.service, reload_interval=0.0)
        )
    remote = None if channel is None else worker.token_sources(channel, reactor)
    index = worker.index(environ)
    sidecar = Sidecar(config, reactor, notifier=notifier, remote_tokens=remote,
                      announce=index in (None, 0))  # fmt: skip
    try:
        sidecar.build()
    except tls.MaterialError as e:
        startup_error(fmt, f"{config.path}: {e}", file=str(config.path))
        return 2
    accept_errors = start_logging(
        config.service.log_format,
        level=args.log_level or config.service.log_level,
        extra={} if index is None else {"worker": index, "pid": os.getpid()},
    )
    if index is None:  # the supervisor logs them once for all its workers
        from proxy.ops.health import log_findings

        log_findings(findings)
    else:
        from proxy.telemetry.logs import fields

        sidecar.access_log.tag = fields({"worker": index, "pid": os.getpid()})
    accept_errors.on_error = lambda reason: sidecar.metrics.accept_errors.labels(reason).inc()
    if config.service.workers_why and not worker.is_worker(environ):
        from twisted.logger import Logger

        Logger(namespace="mtls_sidecar").info(
            "workers: {n} ({why})", n=config.service.workers, why=config.service.workers_why
        )
    sidecar.accept_errors = accept_errors
    raise_fd_limit()
    result = {"code": 0}

    def started() -> None:
        try:
            sidecar.start(inherited)
        except Exception as e:
            startup_error(fmt, str(e))
            result["code"] = 2
            reactor.stop()  # type: ignore[attr-defined]
            return
        install_signal_handlers(reactor, sidecar, lambda code: result.update(code=code))
        if channel is not None:
            from proxy.ops import worker

            def orphaned() -> None:  # the supervisor is gone: drain and leave
                sidecar.stop().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

            worker.serve(channel, sidecar, orphaned)
        settle_heap()
        from proxy.ops.systemd import watchdog_interval

        interval = watchdog_interval(environ)
        if interval:
            from twisted.internet import task

            task.LoopingCall(notifier.watchdog).start(interval / 2)

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result["code"]


def _log_format(path: str) -> str | None:
    """The log format a config that does not load asks for, when its TOML can be read at all
    (the default when it names none); None when even that fails."""
    import tomllib

    from proxy import config as cfg

    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    log = data.get("log")
    fmt = log.get("format") if isinstance(log, dict) else None
    return fmt if fmt in ("json", "text") else cfg.ServiceConfig().log_format


def _finding(fmt: str | None, f: Any) -> None:
    from proxy.telemetry.logs import startup_error

    where = f"{f.file}: {f.key}" if f.key else f.file
    fields = {"file": f.file, "key": f.key} if f.key else {"file": f.file}
    startup_error(fmt, f"{where}: {f.message}", **fields)


def _worker_channel(reactor: Any, environ: dict[str, str], inherited: dict[str, list[int]]) -> Any:
    from proxy.ops import worker
    from proxy.ops.channel import Channel

    inherited.update(worker.passed_listeners(environ))
    channel = Channel({})
    worker.connect(reactor, environ, channel)
    return channel


def raise_fd_limit() -> None:
    """Use the hard limit on open files, as nginx's worker_rlimit_nofile would: the soft limit
    (often 1024) is far below what max_connections allows, and systemd's hard one is high."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def settle_heap() -> None:
    """Everything built at start lives as long as the process: move it out of the cyclic
    collector's sight, so full collections scan only what requests allocate (tens of
    thousands of module objects otherwise rescanned every few thousand requests)."""
    gc.collect()
    gc.freeze()
    # the data path breaks its own reference cycles; collect young garbage less eagerly
    gc.set_threshold(10_000, 20, 20)


def _check(args: argparse.Namespace) -> int:
    from proxy.commands.check import run_check

    return run_check(args.config, as_json=args.json)


def _status(args: argparse.Namespace) -> int:
    from proxy.commands.status import run_status

    return run_status(args.config, admin=args.admin, as_json=args.json)


def _probe(args: argparse.Namespace) -> int:
    from proxy.commands.probe import run_probe

    return run_probe(args.config, args.route, as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    from proxy.wire.reactor import install

    install()  # the demo runs the real data path: the same reactor as `run`
    from proxy.commands.demo import run_demo

    return run_demo()


_CHECK_EXIT_CODES = """\
exit status:
  0  fine, or warnings only
  1  at least one error
  2  usage error (bad arguments)
"""


def build_parser() -> argparse.ArgumentParser:
    from proxy import __version__

    parser = _Parser(
        prog="mtls-sidecar",
        description="Mutual-TLS sidecar: plain HTTP on localhost <-> mutual TLS to a partner.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )
    run = sub.add_parser(
        "run",
        help="run every route of the config in the foreground",
        description="Run every route of the config (egress, ingress and the admin listener) in"
        " the foreground; logs go to stdout. Exits non-zero with a one-line reason when the"
        " config or its key material is bad.",
    )
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warn", "error"),
        help="least severe log level written (default: [log] level, else info)",
    )
    run.set_defaults(func=_run)
    check = sub.add_parser(
        "check",
        help="validate a config and its key material",
        # raw text (for the exit status table): the description carries its own line breaks
        description="Validate a config and its key material without serving: syntax, types,\n"
        "unknown keys, readable files, key matches certificate, chain order, key policy,\n"
        "days to expiry. One line per finding.",
        epilog=_CHECK_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("-c", "--config", required=True, help="TOML config file")
    check.add_argument("--json", action="store_true", help="findings as JSON (for monitoring)")
    check.set_defaults(func=_check)
    probe = sub.add_parser(
        "probe",
        help="dial each route as its peer would and say what happened",
        description="Egress routes: dial the upstream as `run` would (DNS answers, TCP, TLS"
        " version, cipher, ALPN, the peer chain and its verification, our client certificate,"
        " an OAuth token fetch). Ingress routes: dial our own listener as the partner would"
        " (the chain we serve and whether it builds to a Mozilla root, TLS version, cipher,"
        " ALPN, the CA names we ask clients for). Exit 0 when every probed route is fine.",
    )
    probe.add_argument("-c", "--config", required=True, help="TOML config file")
    probe.add_argument("route", nargs="?", help="route name (default: every route)")
    probe.add_argument("--json", action="store_true", help="results as JSON")
    probe.set_defaults(func=_probe)
    status = sub.add_parser(
        "status",
        help="what the running sidecar holds (from its admin listener)",
        description="Ask the running sidecar's admin listener (--admin HOST:PORT, or [admin] "
        "listen in FILE) what it holds: readiness, each route's state and why, the last reload, "
        "the certificates in use (subject, serial, not-after, days left, SHA-256), OAuth token "
        "state per route (never the token), the last upstream connect, the workers, and the "
        "config in effect. Exit status: 0 ready, 1 not ready, 2 not reachable or bad config.",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="TOML config file (for its [admin] listen)")
    where.add_argument(
        "--admin", metavar="HOST:PORT", help="the admin listener; no config file is read"
    )
    status.add_argument("--json", action="store_true", help="the status as JSON")
    status.set_defaults(func=_status)
    demo = sub.add_parser(
        "demo",
        help="both directions on loopback with a throwaway PKI",
        description="The sidecar in both directions on loopback: a throwaway PKI, a local"
        " stand-in for D1 (mutual-TLS origin and OAuth token endpoint), a stand-in internal"
        " app, sample calls both ways and a readable trace. Nothing is written outside a"
        " temporary folder and nothing leaves loopback.",
    )
    demo.set_defaults(func=_demo)
    from proxy.commands import csr as csrcmd

    csrcmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
