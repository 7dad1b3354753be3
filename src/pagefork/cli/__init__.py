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
from typing import Any

from pagefork import __version__
from pagefork.cli.display import examples, safe
from pagefork.errors import PageforkError

#: Exit code for bad input or an unusable environment (argparse uses it too).
EXIT_USAGE = 2


#: Inline reStructuredText that reads as noise in a terminal: ``literal`` and :role:`target`.
_RST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` with inline reStructuredText markup removed (literals, roles)."""
    return _RST_ROLE.sub(r"\1", _RST_LITERAL.sub(r"\1", text))


class PageforkFormatter(argparse.HelpFormatter):
    """Wraps the description and epilog paragraph by paragraph (blank lines apart); a
    paragraph whose lines are indented (examples, lists) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            if para.startswith(" "):
                paragraphs.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paragraphs.append(super()._fill_text(para, width, indent))
        return "\n\n".join(paragraphs)


class PageforkParser(argparse.ArgumentParser):
    """An ArgumentParser whose help is plain text (sub-command parsers are of this class too),
    formatted by :class:`PageforkFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", PageforkFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        """The help text, without reStructuredText markup."""
        return plain_text(super().format_help())


#: Examples for the sub-commands whose module sets none: each is shown in its --help.
EXAMPLES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("demo",): (
        "pagefork demo",
        "pagefork demo --mem-size 64 --forks 4 --workdir demo-work",
        "pagefork demo --branch --plot demo.png",
    ),
    ("serve",): (
        "pagefork serve --mem-file snap/mem --socket /tmp/uffd.sock --record hot.hpl",
        "pagefork serve --mem-file snap/mem --socket /tmp/uffd.sock --hot-pages hot.hpl",
        "pagefork serve --mem-file s3://my-bucket/templates/web --socket /tmp/uffd.sock",
    ),
}


def leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every sub-command parser that takes no further sub-command, with its command path
    (``("forks", "create")``); aliases are left out."""
    found: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    for action in subs:
        seen: set[int] = set()
        for name, child in action.choices.items():
            if id(child) in seen:
                continue  # an alias of one listed already
            seen.add(id(child))
            found += leaf_parsers(child, (*path, name))
    return found


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
    for path, leaf in leaf_parsers(parser):
        if path in EXAMPLES and "examples:" not in (leaf.epilog or ""):
            shown = examples(*EXAMPLES[path])
            leaf.epilog = f"{shown}\n\n{leaf.epilog}" if leaf.epilog else shown
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagefork`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PageforkError as exc:
        print(f"pagefork: error: {safe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
