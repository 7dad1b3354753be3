"""Option types shared by more than one sub-command."""

from __future__ import annotations

import argparse
from typing import Literal

from pagefork.serving.pool import max_workers


def parse_workers(text: str) -> int | Literal["auto"]:
    """``--workers``: ``auto`` (one worker process per usable CPU) or a whole number >= 1."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, not {text!r}")
    if value > max_workers():
        raise argparse.ArgumentTypeError(
            f"at most {max_workers()} here (4 per usable CPU), not {value}"
        )
    return value
