"""The ``pagefork`` command line: one sub-command per module in this package.

Each sub-command module exposes ``add_parser(subparsers)``, which registers its parser and sets
``func`` to a handler taking the parsed namespace and returning the exit code. Any
:class:`~pagefork.errors.PageforkError` becomes a one-line message on stderr and exit code 2.

Help texts may reuse a module's docstring, which is written in reStructuredText. Every parser
here is a :class:`PageforkParser`, which strips inline markup (double backquotes, roles) from
its help output, so none reaches a user's terminal.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from pagefork import __version__
from pagefork.errors import PageforkError

#: Exit code for bad input or an unusable environment (argparse uses it too).
EXIT_USAGE = 2


#: Inline reStructuredText that reads as noise in a terminal: ``literal`` and :role:`target`.
_RST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` with inline reStructuredText markup removed (literals, roles)."""
    return _RST_ROLE.sub(r"\1", _RST_LITERAL.sub(r"\1", text))


class PageforkParser(argparse.ArgumentParser):
    """An ArgumentParser whose help is plain text (sub-command parsers are of this class too)."""

    def format_help(self) -> str:
        """The help text, without reStructuredText markup."""
        return plain_text(super().format_help())


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    from pagefork.cli import daemon_cmd, demo, hotpages_cmd, push, serve

    # add_subparsers makes its parsers of the same class, so every --help is plain text.
    parser = PageforkParser(
        prog="pagefork",
        description="A userfaultfd page server for microVM fork fan-out.",
    )
    parser.add_argument("--version", action="version", version=f"pagefork {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, serve, hotpages_cmd, daemon_cmd, push):
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
