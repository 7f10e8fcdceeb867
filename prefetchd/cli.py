"""The `prefetchd` command line: serve, status, stop, index, check, demo."""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import logging
import os
import sys
import time

from prefetchd import __version__
from prefetchd.errors import PrefetchdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefetchd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prefetchd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground (SIGTERM/SIGINT drain and exit 0)")
    _add_config_args(serve)

    status = sub.add_parser("status", help="show what the daemon is doing")
    status.add_argument("--socket", help="control socket (default: $PREFETCHD_SOCKET or the per-user path)")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                        help="refresh every SECONDS (default 1) until interrupted")
    status.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up when the daemon does not answer within SECONDS (default 10)")

    stop = sub.add_parser("stop", help="ask the daemon to drain and exit")
    stop.add_argument("--socket")
    stop.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the socket to go away")
    stop.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                      help="give up when the daemon does not answer within SECONDS (default 10)")

    index = sub.add_parser("index", help="build or refresh the cached index of a dataset")
    index.add_argument("dataset")
    index.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL / AWS)")
    index.add_argument("--keys-file", help="`aws s3 ls --recursive` output, S3 Inventory CSV, load_data CSV/parquet "
                       "or jump_index.parquet")
    index.add_argument("--json", action="store_true", help="print the summary as JSON")
    index.add_argument("--refresh", action="store_true", default=True, help=argparse.SUPPRESS)
    _add_config_args(index, socket=False)

    check = sub.add_parser("check", help="diagnose access to a dataset (DNS, endpoint, 403, empty prefix)")
    check.add_argument("dataset")
    check.add_argument("--endpoint-url")
    _add_config_args(check, socket=False)

    demo = sub.add_parser("demo", help="stream synthetic plates from a local S3 server, no network needed")
    demo.add_argument("--fields", type=int, default=None, help="number of fields to generate")
    demo.add_argument("--size", type=int, default=None, help="image side in pixels (default 1080)")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--cache-size", type=int, default=None, help="slots (fields); default: the whole dataset")
    demo.add_argument("--data-dir", help="keep the generated plates here (default: a temporary directory)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _add_config_args(p: argparse.ArgumentParser, socket: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (see prefetchd/default_config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. --set s3.max_concurrency=64 (repeatable)")
    if socket:
        p.add_argument("--socket", help="control socket path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PrefetchdError as exc:
        print(f"prefetchd {args.command}: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def load_config(args):
    from prefetchd.config import Config

    overrides = list(args.overrides)
    if getattr(args, "socket", None):
        overrides.append(f"socket={args.socket}")
    if getattr(args, "endpoint_url", None):
        overrides.append(f"s3.endpoint_url={args.endpoint_url}")
    return Config.load(args.config, overrides)


def configure_logging(level: str) -> None:
    # Under systemd, journald stamps every line: do not add a second timestamp.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def cmd_serve(args) -> int:
    import uvloop

    from prefetchd.server import Server

    config = load_config(args)
    configure_logging(config.get("log_level"))
    # systemd's watchdog kills a hung daemon with SIGABRT: the journal then shows where every thread was.
    faulthandler.enable()

    async def run() -> None:
        await Server(config).serve()  # SIGHUP re-reads the same --config and --set (Config.reread)

    uvloop.run(run())
    return 0


def cmd_status(args) -> int:
    from rich.console import Console
    from rich.live import Live

    from prefetchd.control import request
    from prefetchd.status_view import render_status

    if args.json and not args.watch:
        print(json.dumps(request("status", args.socket, timeout=args.timeout), indent=2))
        return 0
    console = Console()
    if not args.watch:
        console.print(render_status(request("status", args.socket, timeout=args.timeout)))
        return 0
    with Live(console=console, auto_refresh=False) as live:
        while True:
            status = request("status", args.socket, timeout=args.timeout)
            if args.json:
                print(json.dumps(status), flush=True)
            else:
                live.update(render_status(status), refresh=True)
            time.sleep(args.watch)


def cmd_stop(args) -> int:
    from prefetchd.config import resolve_socket
    from prefetchd.control import request

    request("stop", args.socket, timeout=args.timeout)
    path = resolve_socket(args.socket)
    deadline = time.monotonic() + args.wait
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition (socket removed at the end of the drain), bounded
    if path.exists():
        print(f"prefetchd stop: the daemon has not finished draining after {args.wait:.0f} s", file=sys.stderr)
        return 1
    print("prefetchd stopped")
    return 0


def cmd_index(args) -> int:
    from prefetchd.index import cli_index

    return cli_index(args, load_config(args))


def cmd_check(args) -> int:
    from prefetchd.check import cli_check

    return cli_check(args, load_config(args))


def cmd_demo(args) -> int:
    if importlib.util.find_spec("moto") is None:  # the dev extra: production nodes do without moto's server
        raise PrefetchdError("the demo serves its plates from moto's S3 server, which is not installed: "
                             "pip install 'prefetchd[dev]'")
    from prefetchd.dev.demo import run_demo

    return run_demo(args)


COMMANDS = {"serve": cmd_serve, "status": cmd_status, "stop": cmd_stop, "index": cmd_index,
            "check": cmd_check, "demo": cmd_demo}


if __name__ == "__main__":
    raise SystemExit(main())
