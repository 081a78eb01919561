"""Command line: argv -> the commands of the product."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence


def _run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from proxy import config as cfg
    from proxy.ops.service import Sidecar, install_signal_handlers
    from proxy.ops.systemd import Notifier, listen_fds
    from proxy.telemetry.logs import start_logging
    from proxy.tls import contexts as tls

    try:
        config = cfg.load(args.config)
    except cfg.ConfigError as e:
        for f in e.findings:
            print(f"mtls-sidecar: {f}", file=sys.stderr)
        return 2
    environ = dict(os.environ)
    inherited = listen_fds(os.environ, os.getpid, unset=True)
    notifier = Notifier(environ)
    sidecar = Sidecar(config, reactor, notifier=notifier)
    try:
        sidecar.build()
    except tls.MaterialError as e:
        print(f"mtls-sidecar: {config.path}: {e}", file=sys.stderr)
        return 2
    accept_errors = start_logging(config.service.log_format)
    accept_errors.on_error = lambda reason: sidecar.metrics.accept_errors.labels(reason).inc()
    sidecar.accept_errors = accept_errors
    raise_fd_limit()
    result = {"code": 0}

    def started() -> None:
        try:
            sidecar.start(inherited)
        except Exception as e:
            print(f"mtls-sidecar: cannot listen: {e}", file=sys.stderr)
            result["code"] = 2
            reactor.stop()  # type: ignore[attr-defined]
            return
        install_signal_handlers(reactor, sidecar, lambda code: result.update(code=code))
        settle_heap()
        from proxy.ops.systemd import watchdog_interval

        interval = watchdog_interval(environ)
        if interval:
            from twisted.internet import task

            task.LoopingCall(notifier.watchdog).start(interval / 2)

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result["code"]


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


def _probe(args: argparse.Namespace) -> int:
    from proxy.commands.probe import run_probe

    return run_probe(args.config, args.route, as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    from proxy.commands.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-sidecar",
        description="Mutual-TLS sidecar: plain HTTP on localhost <-> mutual TLS to a partner.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run every route of the config in the foreground")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.set_defaults(func=_run)
    check = sub.add_parser("check", help="validate a config and its key material")
    check.add_argument("-c", "--config", required=True, help="TOML config file")
    check.add_argument("--json", action="store_true", help="findings as JSON (for monitoring)")
    check.set_defaults(func=_check)
    probe = sub.add_parser("probe", help="dial an egress route's upstream as `run` would")
    probe.add_argument("-c", "--config", required=True, help="TOML config file")
    probe.add_argument("route", nargs="?", help="egress route name (default: every egress route)")
    probe.add_argument("--json", action="store_true", help="results as JSON")
    probe.set_defaults(func=_probe)
    demo = sub.add_parser("demo", help="both directions on loopback with a throwaway PKI")
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
