"""Showing what came from elsewhere (names, ids, paths, error messages) safely on a terminal.

A template's display name is free text, and records written by older versions, or by hand,
may hold anything. Printed raw, an escape sequence would drive the user's terminal (move the
cursor, rewrite earlier lines, change the title), a NUL or a carriage return would hide text,
and a lone surrogate would crash the print with ``UnicodeEncodeError``. :func:`safe` turns each
of those into a visible escape (``\\x1b``, ``\\x00``, ``\\ud800``), so what is shown is what is
there. rich's markup is never applied to such text either (see :func:`cell`).
"""

from __future__ import annotations

import re

from rich.text import Text

#: C0 and C1 control characters, DEL, and lone surrogates (not encodable as UTF-8).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``text`` (as ``str``) with every control character and lone surrogate escaped."""
    return _UNSAFE.sub(_escape, str(text))


def cell(text: object) -> Text:
    """A table cell showing ``text`` safely, with no rich markup applied to it."""
    return Text(safe(text))


def examples(*commands: str) -> str:
    """An epilog paragraph showing ``commands``, for a sub-command's help."""
    return "examples:\n\n" + "\n".join(f"  {c}" for c in commands)
