"""Option types shared by more than one sub-command."""

from __future__ import annotations

import argparse
import re
from typing import Literal

from pagefork.serving.pool import max_workers

_DIGITS = re.compile(r"[0-9]{1,6}")


def parse_workers(text: str) -> int | Literal["auto"]:
    """``--workers``: ``auto`` (one worker process per usable CPU) or a whole number >= 1."""
    if text == "auto":
        return "auto"
    # ASCII digits only: int() would also take " 2", "+2", "2_0" and other scripts' digits.
    value = int(text) if _DIGITS.fullmatch(text) else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, not {text!r}")
    if value > max_workers():
        raise argparse.ArgumentTypeError(
            f"at most {max_workers()} here (4 per usable CPU), not {value}"
        )
    return value
