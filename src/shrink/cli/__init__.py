"""The `shrink` command: parses arguments and calls the library; no logic of its own.

Exit status: 0 success, 2 the user's input is wrong (one line on stderr, no
traceback), 1 an internal error.
"""
from __future__ import annotations

import argparse
import sys

from shrink import __version__
from shrink.cli import compress, demo, evaluate, export, inspect, plan, report, search

COMMANDS = {"plan": plan, "inspect": inspect, "compress": compress, "search": search, "eval": evaluate,
            "export": export, "report": report, "demo": demo}


class UserError(Exception):
    """Wrong input from the user: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shrink",
        description="Model compression: plan, compress, measure, export, prove it deploys.",
    )
    p.add_argument("--version", action="version", version=f"shrink {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"shrink {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # a full disk, a read-only or unwritable output: the user's to fix (exit 2)
        from shrink.cli.oserrors import write_error_line

        line = write_error_line(e, getattr(args, "output", None))
        if line is None:
            raise
        print(f"shrink {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shrink {args.command}: interrupted", file=sys.stderr)
        return 130
