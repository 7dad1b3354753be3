"""The ``pagefork`` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)``, which registers its parser and sets
``func`` to a handler taking the parsed namespace and returning the exit code. Any
:class:`~pagefork.errors.PageforkError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pagefork import __version__
from pagefork.errors import PageforkError

#: Exit code for bad input or an unusable environment (argparse uses it too).
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    from pagefork.cli import daemon_cmd, demo, hotpages_cmd, serve

    parser = argparse.ArgumentParser(
        prog="pagefork",
        description="A userfaultfd page server for microVM fork fan-out.",
    )
    parser.add_argument("--version", action="version", version=f"pagefork {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, serve, hotpages_cmd, daemon_cmd):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagefork`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PageforkError as exc:
        print(f"pagefork: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
