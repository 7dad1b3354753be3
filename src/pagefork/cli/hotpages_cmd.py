"""``pagefork hotpages``: inspect, merge and compare hot-page files (HPL1/HPL2).

The library treats a missing hot-page file as an empty list (no hot set, no prefetch); here the
user named the file, so a missing path is an error like a corrupt one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from pagefork.cli.display import examples, safe
from pagefork.errors import PageforkError
from pagefork.hotlearn import LearnPolicy, history_path, load_history, save_history
from pagefork.hotpages import (
    HotPage,
    HotPageFormat,
    HotPageList,
    at_least,
    intersection,
    load,
    union,
)
from pagefork.regions import PAGE_SIZE

#: How many differing pages the human form of ``diff`` lists per side.
_DIFF_LIST_LIMIT = 20

_PAGE_SIZE_NOTE = (
    "Hot-page files do not store page sizes: runs and bytes assume 4 KiB pages "
    "(a hugepage region's pages count as 4 KiB each)."
)


def add_parser(subparsers: Any) -> None:
    """Register ``hotpages`` and its sub-commands ``show``, ``merge``, ``diff``, ``learn`` and
    ``history``."""
    parser = subparsers.add_parser(
        "hotpages",
        help="inspect, merge and compare hot-page files",
        description="Inspect, merge and compare hot-page files (HPL1 or HPL2).",
    )
    sub = parser.add_subparsers(dest="hotpages_command", metavar="ACTION")
    sub.required = True

    show = sub.add_parser(
        "show",
        help="summarize a hot-page file",
        description="Summarize a hot-page file: pages, regions, contiguous runs. "
        + _PAGE_SIZE_NOTE,
    )
    show.add_argument("file", metavar="FILE", help="an HPL1 or HPL2 hot-page file")
    show.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object (the pages themselves only with --pages)",
    )
    show.add_argument(
        "--pages",
        action="store_true",
        help="with --json: also list every page, as [region, offset] pairs, sorted",
    )
    show.epilog = examples(
        "pagefork hotpages show hot.hpl",
        "pagefork hotpages show hot.hpl --json",
        "pagefork hotpages show hot.hpl --json --pages",
    )
    show.set_defaults(func=run_show)

    merge = sub.add_parser(
        "merge",
        help="combine the hot sets of several warm-up runs",
        description="Combine hot-page files from several warm-up runs. Pages keep the "
        "first-touch order of the first file they appear in.",
    )
    merge.add_argument("files", nargs="+", metavar="FILE", help="hot-page files to combine")
    merge.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="file to write, atomically; an existing OUT must be a regular file (a symbolic "
        "link, FIFO, device or directory is refused and left untouched)",
    )
    merge.add_argument(
        "--mode",
        choices=("union", "intersect", "min-count"),
        default="union",
        help="union: pages in any file (default); intersect: pages in every file; "
        "min-count: pages in at least --min-count files",
    )
    merge.add_argument(
        "--min-count", type=int, metavar="K", help="with --mode min-count: keep pages in >= K files"
    )
    merge.add_argument(
        "--format",
        choices=("hpl1", "hpl2"),
        default=None,
        help="hpl1: sorted, readable by every HPL1 reader (the Go page server's too); hpl2: "
        "keeps first-touch order and times. Default: the inputs' format, so hpl1 when every "
        "input is HPL1 and hpl2 when any is HPL2",
    )
    merge.epilog = examples(
        "pagefork hotpages merge run1.hpl run2.hpl -o hot.hpl",
        "pagefork hotpages merge run*.hpl --mode min-count --min-count 2 -o hot.hpl",
    )
    merge.set_defaults(func=run_merge)

    diff = sub.add_parser(
        "diff",
        help="compare two hot-page files",
        description="List the pages only in A, only in B, and the count in both.",
    )
    diff.add_argument("a", metavar="A", help="first hot-page file")
    diff.add_argument("b", metavar="B", help="second hot-page file")
    diff.add_argument("--json", action="store_true", help="print one JSON object")
    diff.epilog = examples(
        "pagefork hotpages diff run1.hpl run2.hpl",
        "pagefork hotpages diff run1.hpl run2.hpl --json",
    )
    diff.set_defaults(func=run_diff)

    learn = sub.add_parser(
        "learn",
        help="make a template's hot set learn from its prefetched forks' misses",
        description="Keep a learning policy beside a hot-page file (FILE.history.json): the "
        "daemon then records what each prefetched fork of the template still faults, adds a "
        "page when --join of the last --window forks missed it, never grows the set beyond "
        "(1 + --max-growth) times its recorded size, and counts one fork's misses only up to "
        "--per-fork times that size.",
        epilog=examples(
            "pagefork hotpages learn state/templates/web/hot-pages.hpl --window 8 --join 3",
            "pagefork hotpages learn state/templates/web/hot-pages.hpl --off",
        ),
    )
    learn.add_argument(
        "file",
        metavar="FILE",
        help="the template's hot-page file (it may not exist yet: the set its warm-up records "
        "then learns)",
    )
    learn.add_argument("--window", type=int, default=8, metavar="N", help="forks remembered")
    learn.add_argument(
        "--join", type=int, default=3, metavar="K", help="misses among them that add a page"
    )
    learn.add_argument(
        "--max-growth",
        type=float,
        default=0.10,
        metavar="SHARE",
        help="how far past its recorded size the set may grow (default 0.10)",
    )
    learn.add_argument(
        "--per-fork",
        type=float,
        default=0.05,
        metavar="SHARE",
        help="the most one fork's misses count, as a share of the recorded size (default 0.05)",
    )
    learn.add_argument("--off", action="store_true", help="stop learning (keeps the set)")
    learn.set_defaults(func=run_learn)

    history = sub.add_parser(
        "history",
        help="show how a learning hot set changed",
        description="Show the generations of a learning hot set: after how many forks it "
        "changed, its size, the pages that joined and left.",
        epilog=examples(
            "pagefork hotpages history state/templates/web/hot-pages.hpl",
            "pagefork hotpages history state/templates/web/hot-pages.hpl --json",
        ),
    )
    history.add_argument("file", metavar="FILE", help="the template's hot-page file")
    history.add_argument("--json", action="store_true", help="print one JSON object")
    history.set_defaults(func=run_history)


# --- summaries (pure) ------------------------------------------------------------------------


def count_runs(pages: list[HotPage]) -> int:
    """Contiguous runs of 4 KiB pages in ``pages`` (sorted, deduplicated)."""
    runs = 0
    previous: HotPage | None = None
    for page in pages:
        if (
            previous is None
            or page.region != previous.region
            or page.page_offset != previous.page_offset + PAGE_SIZE
        ):
            runs += 1
        previous = page
    return runs


def summarize(hot: HotPageList) -> dict[str, Any]:
    """The numbers ``show`` prints: count, bytes, runs, per-region figures, first/last page."""
    pages = hot.sorted_pages()
    by_region: dict[int, list[HotPage]] = {}
    for page in pages:
        by_region.setdefault(page.region, []).append(page)
    regions = [
        {
            "region": region,
            "pages": len(group),
            "runs": count_runs(group),
            "bytes": len(group) * PAGE_SIZE,
            "first_offset": group[0].page_offset,
            "last_offset": group[-1].page_offset,
        }
        for region, group in sorted(by_region.items())
    ]
    times = [t for t in hot.times() if t is not None]
    return {
        "format": hot.source_format,
        "count": len(pages),
        "bytes": len(pages) * PAGE_SIZE,
        "runs": count_runs(pages),
        "first": list(pages[0]) if pages else None,
        "last": list(pages[-1]) if pages else None,
        "first_touch_span_seconds": max(times) if times else None,
        "regions": regions,
    }


def merge_format(lists: list[HotPageList]) -> HotPageFormat:
    """The format ``merge`` writes by default: HPL1 when every input is HPL1, else HPL2.

    HPL1 inputs carry no order or times, so HPL1 loses nothing and stays readable by every
    HPL1 reader; an HPL2 input's first-touch order would be lost in HPL1.
    """
    return "hpl1" if all(hot.source_format == "hpl1" for hot in lists) else "hpl2"


def _load_named(path: str) -> HotPageList:
    return load(path, missing_ok=False)


def _console() -> Console:
    # Built per call so it writes to the sys.stdout of the moment (tests capture it); no
    # markup, so a path with brackets prints as it is.
    return Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True)


# --- handlers --------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    """``hotpages show FILE [--json]``."""
    if args.pages and not args.json:
        raise PageforkError("hotpages show: --pages lists the pages in the JSON (add --json)")
    hot = _load_named(args.file)
    summary = summarize(hot)
    if args.json:
        doc = {"file": args.file, **summary}
        if args.pages:
            doc["pages"] = [list(page) for page in hot.sorted_pages()]
        print(json.dumps(doc))
        return 0
    console = _console()
    head = Table(title=safe(args.file), show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("format", summary["format"] or "-")
    head.add_row("pages", str(summary["count"]))
    head.add_row("bytes", f"{summary['bytes']} (assuming 4 KiB pages)")
    head.add_row("runs", f"{summary['runs']} (contiguous 4 KiB pages)")
    if summary["first"] is not None:
        head.add_row("first", f"region {summary['first'][0]}, offset {summary['first'][1]:#x}")
        head.add_row("last", f"region {summary['last'][0]}, offset {summary['last'][1]:#x}")
    if summary["first_touch_span_seconds"] is not None:
        span = summary["first_touch_span_seconds"]
        head.add_row("last first touch", f"{span:.6f} s after the handshake")
    console.print(head)
    if summary["regions"]:
        table = Table(title="per region")
        for name in ("region", "pages", "runs", "bytes", "first offset", "last offset"):
            table.add_column(name, justify="right")
        for r in summary["regions"]:
            table.add_row(
                str(r["region"]),
                str(r["pages"]),
                str(r["runs"]),
                str(r["bytes"]),
                f"{r['first_offset']:#x}",
                f"{r['last_offset']:#x}",
            )
        console.print(table)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """``hotpages merge FILE... -o OUT [--mode ...] [--min-count K] [--format ...]``."""
    if args.mode == "min-count" and args.min_count is None:
        raise PageforkError("hotpages merge: --mode min-count needs --min-count K")
    if args.mode != "min-count" and args.min_count is not None:
        raise PageforkError("hotpages merge: --min-count only applies to --mode min-count")
    n = len(args.files)
    if args.mode == "min-count" and not 1 <= args.min_count <= n:
        raise PageforkError(
            f"hotpages merge: --min-count must be between 1 and {n} (the number of files)"
        )
    lists = [_load_named(path) for path in args.files]
    if args.mode == "union":
        merged = union(lists)
    elif args.mode == "intersect":
        merged = intersection(lists)
    else:
        merged = at_least(lists, args.min_count)
    fmt = args.format or merge_format(lists)
    merged.save(args.output, fmt=fmt)
    how = f"min-count {args.min_count}" if args.mode == "min-count" else args.mode
    print(f"wrote {len(merged)} pages to {safe(args.output)} ({how} of {n} files, {fmt})")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """``hotpages diff A B [--json]``."""
    a = _load_named(args.a)
    b = _load_named(args.b)
    set_a = set(a.sorted_pages())
    set_b = set(b.sorted_pages())
    only_a = sorted(set_a - set_b)
    only_b = sorted(set_b - set_a)
    common = len(set_a & set_b)
    if args.json:
        print(
            json.dumps(
                {
                    "a": args.a,
                    "b": args.b,
                    "count_a": len(set_a),
                    "count_b": len(set_b),
                    "common": common,
                    "only_in_a": [list(p) for p in only_a],
                    "only_in_b": [list(p) for p in only_b],
                }
            )
        )
        return 0
    console = _console()
    a_name, b_name = safe(args.a), safe(args.b)
    table = Table(title=f"{a_name} vs {b_name}")
    table.add_column("", style="bold")
    table.add_column("pages", justify="right")
    table.add_row(f"only in {a_name}", str(len(only_a)))
    table.add_row(f"only in {b_name}", str(len(only_b)))
    table.add_row("in both", str(common))
    console.print(table)
    for path, pages in ((args.a, only_a), (args.b, only_b)):
        if not pages:
            continue
        console.print(f"only in {safe(path)}:")
        for page in pages[:_DIFF_LIST_LIMIT]:
            console.print(f"  region {page.region} offset {page.page_offset:#x}")
        if len(pages) > _DIFF_LIST_LIMIT:
            console.print(f"  ... and {len(pages) - _DIFF_LIST_LIMIT} more (--json lists all)")
    return 0


def run_learn(args: argparse.Namespace) -> int:
    """``hotpages learn``: write (or with ``--off`` remove) the learning policy of FILE."""
    # The template may have no hot set yet: it learns from the one its warm-up records.
    hot = load(args.file) if os.path.exists(args.file) else None
    path = history_path(args.file)
    if args.off:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PageforkError(f"{path}: {exc.strerror or exc}") from None
        print(f"{args.file}: the hot set no longer learns")
        return 0
    try:
        policy = LearnPolicy(args.window, args.join, args.max_growth, args.per_fork)
    except ValueError as exc:
        raise PageforkError(f"hotpages learn: {exc}") from None
    known = load_history(args.file)
    generations = known.generations if known is not None else []
    base = known.base if known is not None and known.base is not None else None
    if base is None and hot is not None:
        base = len(hot)
    save_history(args.file, policy, generations, base)
    bound = (
        f"at most {int(base * (1 + policy.max_growth))} pages (recorded: {base})"
        if base is not None
        else f"at most {1 + policy.max_growth:g} times the set its warm-up records"
    )
    print(
        f"{args.file}: learns from prefetched forks: a page joins when {policy.join} of the "
        f"last {policy.window} forks missed it; {bound}"
    )
    return 0


def run_history(args: argparse.Namespace) -> int:
    """``hotpages history``: the generations kept beside FILE."""
    hot = _load_named(args.file)
    known = load_history(args.file)
    if known is None:
        raise PageforkError(
            f"{args.file}: no history (the hot set does not learn: see pagefork hotpages learn)"
        )
    doc = {
        "file": args.file,
        "pages": len(hot),
        "base": known.base,
        "policy": asdict(known.policy),
        "generations": [asdict(g) for g in known.generations],
    }
    if args.json:
        print(json.dumps(doc))
        return 0
    out = _console()
    out.print(
        f"{args.file}: {len(hot)} pages now, {known.base} when recorded; a page joins "
        f"when {known.policy.join} of the last {known.policy.window} forks missed it",
        markup=False,
        highlight=False,
    )
    table = Table("generation", "after forks", "pages", "joined", "left", "at (UTC)")
    for g in known.generations:
        table.add_row(
            str(g.generation),
            str(g.forks),
            str(g.size),
            f"+{g.joined}",
            f"-{g.left}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(g.at)),
        )
    out.print(table)
    return 0
