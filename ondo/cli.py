"""The `ondo` command: each package adds its own subcommands through `register`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ondo.cli_errors import describe_user_error, user_error

log = logging.getLogger("ondo")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Each module defines `register(subparsers)`, adding parsers whose `func(args) -> int` runs them.
COMMAND_MODULES = (
    "ondo.engine.cli",
    "ondo.server.cli",
    "ondo.bench.cli",
    "ondo.telemetry.cli",
    "ondo.twin.cli",
    "ondo.events.cli",
    "ondo.agent.cli",
    "ondo.console.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ondo", description=__doc__)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG, INFO, WARNING or ERROR (any case)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module (or its package) is absent
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # Bad input gets one clear line and exit status 2, as argparse gives bad flags; the
        # traceback is still there at --log-level DEBUG. Anything else is a defect: raised.
        if not user_error(e):
            raise
        log.debug("%s failed", args.command, exc_info=True)
        print(f"error: {describe_user_error(e, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
