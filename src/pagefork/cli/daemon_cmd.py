"""``pagefork daemon``, and the verbs that talk to it: ``pagefork templates ...``,
``pagefork forks ...``.

The daemon serves every template's forks and answers a JSON HTTP API on ``--control`` (a
mode-0600 Unix socket); the verbs are thin wrappers over :class:`~pagefork.daemon.client.
DaemonClient`. ``--control`` defaults to ``$PAGEFORK_CONTROL``, else ``/run/pagefork.sock``,
for the daemon and the verbs alike, so exporting ``PAGEFORK_CONTROL`` once points both at the
same socket. Help texts are plain text: argparse prints them as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pagefork.cli.display import cell, safe
from pagefork.cli.display import examples as _examples
from pagefork.cli.options import parse_workers
from pagefork.cli.store_options import add_cache_arguments, store_options
from pagefork.errors import PageforkError

DEFAULT_CONTROL = "/run/pagefork.sock"


def _control_default() -> str:
    return os.environ.get("PAGEFORK_CONTROL", DEFAULT_CONTROL)


#: How the verbs find the daemon, for their --help.
_FINDING_THE_DAEMON = (
    "These verbs talk to a running 'pagefork daemon' through its control socket: --control "
    f"PATH, else $PAGEFORK_CONTROL, else {DEFAULT_CONTROL}."
)


#: The words for a fork's state, as the CLI, the API and the metrics use them.
_STATES = (
    "A fork is live while its VMM runs, and exited once its VMM has exited (it is held, and "
    "counted, until it is released); a released fork is gone, as is a deleted template."
)

#: The options each VMM driver takes, for 'forks create --help'.
DRIVER_OPTIONS_HELP = """driver options (--option KEY=VALUE):

  --vmm firecracker
    api_socket=PATH         a Firecracker started with --api-sock PATH, not yet loaded
    jailer={...}            start Firecracker through the jailer instead (an object)
    api_timeout=SECONDS     bound on each API call (default: the restore timeout)
    stop=kill|ctrl-alt-del  how the fork's release stops Firecracker (default kill)
    stop_timeout=SECONDS    how long a ctrl-alt-del stop may take
    network_overrides={...} {"IFACE": "tap-{fork_hash}"}: the fork's tap per interface
                            (or Firecracker's [{"iface_id": .., "host_dev_name": ..}]);
                            {fork_hash}: 10 hex digits of the fork id's SHA-256, so the
                            name fits Linux's 15 characters whatever the id
    vsock_uds=PATTERN       the fork's vsock socket path, with {fork} or {fork_hash} in it
    vsock_override={...}    the same, as Firecracker spells it: {"uds_path": PATTERN}
    load_fields={...}       extra PUT /snapshot/load fields, as Firecracker spells them
    snapshots=true          keep dirty-page tracking on, for 'forks snapshot'
  --vmm kvm (the built-in microVM)
    fork_index=N            which trace variant the guest walks (default 0)
    snapshots=true          log the guest's writes and keep the fork after its guest's
                            run, for 'forks snapshot' (else it exits when the guest is done)"""


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        default=_control_default(),
        metavar="PATH",
        help=f"the daemon's control socket (default: $PAGEFORK_CONTROL, else {DEFAULT_CONTROL})",
    )


def _add_prefetch_policy(p: Any, whose: str) -> None:
    """The two options that choose how a fork's hot set goes in (``whose``: for the help)."""
    p.add_argument(
        "--prefetch-policy",
        choices=("before-resume", "stream"),
        help=f"{whose}: install the whole hot set before the VMM resumes (before-resume, the "
        "daemon's default), or resume once --prefetch-head pages are in and stream the rest "
        "while the guest runs (stream)",
    )
    p.add_argument(
        "--prefetch-head",
        type=int,
        metavar="PAGES",
        help="with --prefetch-policy stream: the hot pages, in first-touch order, installed "
        "before resume",
    )


def _prefetch_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields --prefetch-policy and --prefetch-head give (none when not given)."""
    fields: dict[str, Any] = {}
    if args.prefetch_policy is not None:
        fields["prefetch_policy"] = args.prefetch_policy
    if args.prefetch_head is not None:
        fields["prefetch_head"] = args.prefetch_head
    return fields


def add_parser(subparsers: Any) -> None:
    """Register ``daemon``, ``templates`` and ``forks``."""
    d = subparsers.add_parser(
        "daemon",
        help="serve every template's forks, controlled over a Unix socket",
        description="Run the page-server daemon: templates under --state-dir, a JSON HTTP "
        "control API on --control (mode 0600), Prometheus metrics at GET /metrics. Stops "
        "cleanly on SIGINT, SIGTERM and SIGHUP (releasing every fork; SIGHUP stays ignored "
        "under nohup). With --on-sighup takeover, SIGHUP upgrades in place instead: a new "
        "daemon of the installed code takes every live fork over (see --takeover).",
    )
    d.add_argument("--state-dir", required=True, metavar="DIR", help="templates live here")
    _add_control(d)
    d.add_argument("--socket-dir", metavar="DIR", help="fork sockets (default STATE_DIR/forks)")
    d.add_argument(
        "--record-max-seconds",
        type=float,
        default=30.0,
        metavar="T",
        help="warm-up recording window in seconds (default 30)",
    )
    d.add_argument(
        "--record-max-share",
        type=float,
        default=0.25,
        metavar="SHARE",
        help="warm-up recording window as a share of guest pages (default 0.25)",
    )
    d.add_argument(
        "--workers",
        type=parse_workers,
        default="auto",
        metavar="N|auto",
        help="worker processes per template's page server (default auto: one per usable CPU); "
        "a worker that dies is replaced and its forks are served on without loss",
    )
    d.add_argument(
        "--max-layer-depth",
        type=int,
        metavar="N",
        help="flatten a snapshot's template at once when its chain would be deeper than N "
        "layers (default: only the hard limit on a chain's depth applies)",
    )
    add_cache_arguments(d, "STATE_DIR/chunk-cache")
    d.add_argument(
        "--takeover",
        action="store_true",
        help="take over from the daemon running on --state-dir (through STATE_DIR/"
        "takeover.sock): its control socket and every live fork move to this process, no "
        "fork or client notices, and the old daemon exits 0. If the takeover fails the old "
        "one serves on and this exits 2 with the reason",
    )
    d.add_argument(
        "--on-sighup",
        choices=("stop", "takeover"),
        default="stop",
        help="what SIGHUP does: stop (default; release every fork and exit, like SIGTERM) or "
        "takeover (upgrade in place: start 'python -m pagefork daemon SAME-OPTIONS "
        "--takeover' with the code installed now and hand everything to it; if it fails, "
        "serve on). The systemd unit in contrib/systemd reloads this way",
    )
    d.add_argument(
        "--ksm-pages-to-scan",
        type=int,
        metavar="N",
        help="set KSM's scan rate (/sys/kernel/mm/ksm/pages_to_scan, pages per 20 ms by "
        "default) at start, for templates created with --share-memory; the setting stays. "
        "KSM itself is never turned on by pagefork",
    )
    d.add_argument("-v", "--verbose", action="store_true", help="log the fork lifecycle")
    d.set_defaults(func=run_daemon)

    d.epilog = _examples(
        "pagefork daemon --state-dir /var/lib/pagefork --control /run/pagefork.sock",
        "pagefork daemon --state-dir /var/lib/pagefork --on-sighup takeover --workers 4",
    )

    t = subparsers.add_parser(
        "templates",
        help="list, show, create, delete daemon templates",
        description=f"List, show, create and delete the daemon's templates. {_FINDING_THE_DAEMON}",
    )
    tsub = t.add_subparsers(dest="templates_command", metavar="ACTION")
    tsub.required = True
    tl = tsub.add_parser(
        "list",
        help="list templates",
        description="List the daemon's templates: kind, memory, whether a hot set was "
        f"recorded, and their forks by state. {_STATES}",
    )
    tl.epilog = _examples("pagefork templates list", "pagefork templates list --json")
    tl.set_defaults(func=run_templates_list)
    ts = tsub.add_parser(
        "show",
        help="show one template",
        description="Show one template's record: its files, sizes, hot set, parent and "
        f"layers, and its forks by state. {_STATES}",
    )
    ts.add_argument("id", help="the template's id (see 'templates list')")
    ts.epilog = _examples("pagefork templates show web", "pagefork templates show web --json")
    ts.set_defaults(func=run_templates_show)
    tc = tsub.add_parser(
        "create",
        help="create a template from a Firecracker snapshot, the built-in microVM, or object "
        "storage",
        description="With --mem-file and --snapshot: register a Firecracker snapshot "
        "(referenced, or copied with --copy). With --microvm: build a microVM template. With "
        "--from s3://BUCKET/PREFIX: a template pushed with 'pagefork push', served lazily.",
    )
    tc.add_argument("id", help="the new template's id: 1-64 of [A-Za-z0-9._-]")
    tc.add_argument("--name", help="a display name (default: the id)")
    tc.add_argument("--mem-file", help="Firecracker snapshot: the guest memory file")
    tc.add_argument("--snapshot", help="Firecracker snapshot: the VM state file")
    tc.add_argument("--page-size", type=int, help="Firecracker snapshot: page size in bytes")
    tc.add_argument("--copy", action="store_true", help="copy the snapshot files in")
    tc.add_argument("--microvm", action="store_true", help="build a built-in microVM template")
    tc.add_argument(
        "--share-memory",
        action="store_true",
        help="forks of this template share the memory they hold in common (KSM; only for "
        "forks that trust each other: see the density docs); needs KSM on",
    )
    tc.add_argument("--mem-size", type=int, metavar="MIB", help="microVM RAM (default 64)")
    tc.add_argument("--vcpus", type=int, help="microVM vCPUs (default 1)")
    tc.add_argument(
        "--from",
        dest="source",
        metavar="s3://BUCKET/PREFIX",
        help="a template pushed with 'pagefork push': served lazily from the store (its "
        "vmstate and hot set come with it)",
    )
    _add_prefetch_policy(tc, "this template's forks")
    tc.epilog = _examples(
        "pagefork templates create web --mem-file snap/mem --snapshot snap/vmstate",
        "pagefork templates create vm --microvm --mem-size 64",
        "pagefork templates create web --from s3://my-bucket/templates/web",
    )
    tc.set_defaults(func=run_templates_create)
    td = tsub.add_parser(
        "delete",
        help="delete a template (refused while it has forks)",
        description="Delete a template: its record, hot set and the files it owns (a "
        "referenced snapshot's files stay). Refused while the daemon holds forks of it, live "
        "or exited: release them first ('pagefork forks release FORK').",
    )
    td.add_argument("id", help="the template's id (see 'templates list')")
    td.epilog = _examples("pagefork templates delete web")
    td.set_defaults(func=run_templates_delete)
    tr = tsub.add_parser(
        "rerecord",
        help="make the next fork record a new hot set",
        description="Make the template's next fork a warm-up again: it records the pages "
        "its guest touches, which then replace the template's hot set. Until it is saved, "
        "other forks are prefetched the old one.",
    )
    tr.add_argument("id", help="the template's id (see 'templates list')")
    tr.epilog = _examples("pagefork templates rerecord web")
    tr.set_defaults(func=run_templates_rerecord)
    tf = tsub.add_parser(
        "flatten",
        help="merge a child template's layers into one mem-file (it then needs no parent)",
        description="Merge a child template's layers (from 'forks snapshot') into one "
        "mem-file, so it no longer depends on its parent.",
    )
    tf.add_argument("id", help="the template to flatten")
    tf.epilog = _examples("pagefork templates flatten web-warm")
    tf.set_defaults(func=run_templates_flatten)

    f = subparsers.add_parser(
        "forks",
        help="list, create, show, release daemon forks",
        description=f"List, create, show and release the daemon's forks. {_STATES} "
        f"{_FINDING_THE_DAEMON}",
    )
    fsub = f.add_subparsers(dest="forks_command", metavar="ACTION")
    fsub.required = True
    fl = fsub.add_parser(
        "list",
        help="list the forks the daemon holds, live and exited",
        description=f"List the forks the daemon holds, oldest first, with their state. {_STATES}"
        ' With --json: one object, {"forks": [...]}, as GET /forks answers (earlier '
        "versions printed the bare list).",
    )
    fl.epilog = _examples("pagefork forks list", "pagefork forks list --json | jq '.forks[]'")
    fl.set_defaults(func=run_forks_list)
    fc = fsub.add_parser(
        "create",
        help="create a fork; prints its id and uffd socket",
        description="Register a fork of TEMPLATE. With --vmm the daemon restores, prefetches "
        "and resumes the VMM itself; otherwise point your VMM at the printed socket.",
    )
    fc.add_argument("template", help="the template to fork (see 'templates list')")
    fc.add_argument("--id", dest="fork_id", help="the fork id (default: generated)")
    fc.add_argument("--vmm", help="VMM driver to start the fork with (firecracker, kvm)")
    fc.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a driver option (VALUE parsed as JSON when it can be); repeatable; the options "
        "each driver takes are listed below",
    )
    _add_prefetch_policy(fc, "this fork (overrides its template's)")
    fc.epilog = (
        DRIVER_OPTIONS_HELP
        + "\n\n"
        + _examples(
            "pagefork forks create vm --vmm kvm --option snapshots=true",
            "pagefork forks create web --vmm firecracker --option api_socket=/run/fc-1.sock",
            "pagefork forks create web --id web-1    # your VMM connects to the printed socket",
            "pagefork forks create vm --vmm kvm --prefetch-policy stream --prefetch-head 256",
        )
    )
    fc.set_defaults(func=run_forks_create)
    fs = fsub.add_parser(
        "show",
        help="show a fork and its counters",
        description="Show one fork: its template, state, role in the hot-page loop, VMM, "
        f"prefetch result and the page server's counters for it. {_STATES}",
    )
    fs.add_argument("id", help="the fork's id (see 'forks list')")
    fs.epilog = _examples("pagefork forks show web-1", "pagefork forks show web-1 --json")
    fs.set_defaults(func=run_forks_show)
    fd = fsub.add_parser(
        "release",
        aliases=["delete"],
        help="release a fork (stop its VMM if the daemon started it; 'delete' works too)",
        description="Release a fork, live or exited: stop its VMM if the daemon started it, "
        "stop serving it, and print its final counters. A released fork is gone; its "
        "template can then be deleted once it has no other fork.",
    )
    fd.add_argument("id", help="the fork's id (see 'forks list')")
    fd.epilog = _examples("pagefork forks release web-1")
    fd.set_defaults(func=run_forks_delete)
    fsn = fsub.add_parser(
        "snapshot",
        help="snapshot a fork into a child template of its own template",
        description="Pause the fork's VMM, register the memory it changed as template NAME "
        "(a layer over the fork's template), then resume the fork, or release it with "
        "--release. The fork must be live, created with --vmm (a built-in microVM fork also "
        "with --option snapshots=true, or it exits after its guest's run).",
    )
    fsn.add_argument("id", help="the fork to snapshot")
    fsn.add_argument("--as", dest="template", required=True, metavar="NAME", help="new template")
    fsn.add_argument("--release", action="store_true", help="release the fork afterwards")
    fsn.epilog = _examples("pagefork forks snapshot vm-1 --as vm-warm")
    fsn.set_defaults(func=run_forks_snapshot)
    for p in (tl, ts, tc, td, tr, tf, fl, fc, fs, fd, fsn):
        p.epilog = f"{p.epilog}\n\n{_FINDING_THE_DAEMON}"
        _add_control(p)
        p.add_argument("--json", action="store_true", help="print JSON")


# --- daemon ----------------------------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, then release every fork and exit 0."""

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pagefork: %(message)s",
        stream=sys.stderr,
    )
    if not 0 < args.record_max_share <= 1 or args.record_max_seconds <= 0:
        raise PageforkError("--record-max-share must be in (0, 1], --record-max-seconds > 0")
    from pagefork.layers.source import MAX_DEPTH

    if args.max_layer_depth is not None and not 1 <= args.max_layer_depth <= MAX_DEPTH:
        raise PageforkError(
            f"--max-layer-depth must be in 1..{MAX_DEPTH}, not {args.max_layer_depth}"
        )
    if args.ksm_pages_to_scan is not None:
        _tune_ksm(args.ksm_pages_to_scan)
    # SIGHUP (its terminal or supervisor went away) stops it cleanly too, like SIGTERM, unless
    # --on-sighup takeover; one that is ignored on entry (nohup) stays ignored: that caller
    # asked it to outlive them.
    from pagefork.daemon.main import serve_daemon
    from pagefork.signals import SignalInbox

    dirs = [d for d in (args.state_dir, args.cache_dir, args.socket_dir) if d]
    dirs += [os.path.join(args.state_dir, name) for name in _SKELETON]
    made = [_first_missing(d) for d in dirs]
    try:
        store = store_options(args, os.path.join(args.state_dir, "chunk-cache"))
        with SignalInbox(
            (signal.SIGINT, signal.SIGTERM, signal.SIGHUP), keep_ignored=(signal.SIGHUP,)
        ) as inbox:
            serve_daemon(args, inbox, store)
    except BaseException:
        # Refused (another daemon, a control socket in use...) or failed: what this start
        # made and nothing was put in goes again. A directory holding anything else stays.
        for top in made:
            if top is not None:
                _remove_skeleton(top)
        raise
    return 0


#: What a daemon's start puts in its state directory before it holds anything of worth.
_SKELETON_FILES = frozenset({"daemon.lock"})
_SKELETON = ("daemon.lock", "chunk-cache", "forks", "fork-sockets", "templates")


def _first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` (itself included) that does not exist yet, or
    None: what creating ``path`` would make."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.lexists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_skeleton(top: str) -> None:
    """Remove ``top`` if it holds only empty directories and the daemon's lock file (what a
    start makes); anything else there keeps it, and the directories on the way to it."""
    if os.path.isfile(top) and os.path.basename(top) in _SKELETON_FILES:
        with contextlib.suppress(OSError):
            os.unlink(top)
        return
    for root, _dirs, files in os.walk(top, topdown=False):
        for name in files:
            if name in _SKELETON_FILES and os.path.isfile(os.path.join(root, name)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
        with contextlib.suppress(OSError):
            os.rmdir(root)  # fails, as it should, when anything else is left in it


def _tune_ksm(pages_to_scan: int) -> None:
    """``--ksm-pages-to-scan``: write the scan rate (a host setting that outlives the daemon,
    so a successor taking over finds it as set); a one-line error if it cannot."""
    from pagefork import ksm

    if not 1 <= pages_to_scan <= 1_000_000:
        raise PageforkError(f"--ksm-pages-to-scan must be in 1..1000000, not {pages_to_scan}")
    ksm.write_setting("pages_to_scan", pages_to_scan)
    note = ksm.off_note()
    if note is not None:
        print(f"pagefork: {note}", file=sys.stderr)


# --- verbs -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from pagefork.daemon.client import DaemonClient

    return DaemonClient(args.control)


def _print_json(doc: object) -> None:
    # ensure_ascii: whatever a record holds (a lone surrogate, an escape) prints as \u escapes.
    print(json.dumps(doc, indent=2, ensure_ascii=True))


def _console() -> Console:
    # No markup and no highlighting: names are shown as they are (see cli.display). Off a
    # terminal (a pipe, a file) nothing is cut to a width: every row is whole.
    out = Console(highlight=False, markup=False, emoji=False)
    if not out.is_terminal:
        out.width = _UNBOUNDED_WIDTH
    return out


#: Width of output that goes to no terminal: wide enough that no cell is ever cut.
_UNBOUNDED_WIDTH = 10_000


def _table(*columns: str, header: bool = True) -> Table:
    """A table whose cells wrap (fold) rather than being cut with an ellipsis on a terminal
    narrower than they are."""
    table = Table(box=box.SIMPLE_HEAD if header else box.SIMPLE, show_header=header)
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def run_templates_list(args: argparse.Namespace) -> int:
    """``templates list``."""
    doc = _client(args).templates()
    if args.json:
        _print_json(doc)
        return 0
    table = _table("id", "kind", "memory", "hot set", "live forks", "exited forks", "mem-file")
    for t in doc["templates"]:
        table.add_row(
            cell(t["id"]),
            cell(t["kind"]),
            _mib(t["mem_size"]),
            "yes" if t["has_hot_pages"] else "no",
            str(t.get("live_forks", 0)),
            str(t.get("exited_forks", 0)),
            cell(t["mem_file"]),
        )
    out = _console()
    out.print(table)
    for err in doc["errors"]:
        out.print(Text.assemble(("broken: ", "red"), safe(err)))
    return 0


def run_templates_show(args: argparse.Namespace) -> int:
    """``templates show ID``."""
    _show(_client(args).template(args.id), args.json)
    return 0


#: Fields holding seconds since the epoch, shown as local dates.
_TIMESTAMPS = frozenset({"created", "last_used"})


def shown_value(key: str, value: Any) -> str:
    """How ``show`` prints one field: dates for timestamps, seconds with units, floats to a
    few significant digits (also inside objects), and text escaped (see cli.display)."""
    if key in _TIMESTAMPS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
    if isinstance(value, float):
        if key == "seconds" or key.endswith("_seconds"):
            return _duration(value)
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return safe(json.dumps(_rounded(value), ensure_ascii=True))
    return safe(value)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


def _rounded(value: Any) -> Any:
    """``value`` with every float cut to 4 significant digits (for display only)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _show(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(doc)
        return
    table = _table("field", "value", header=False)
    table.columns[0].style = "bold"
    table.columns[0].overflow = "fold"
    for key, value in doc.items():
        table.add_row(cell(key), Text(shown_value(key, value)))
    _console().print(table)


def run_templates_create(args: argparse.Namespace) -> int:
    """``templates create ID (--mem-file F --snapshot S | --microvm)``."""
    fields: dict[str, Any] = {}
    if args.name:
        fields["name"] = args.name
    if args.share_memory:
        fields["share_memory"] = True
    if args.source:
        if args.microvm or args.mem_file or args.snapshot:
            raise PageforkError("--from takes no --microvm, --mem-file or --snapshot")
        client = _client(args)
        doc = client.create_template_from(
            args.id, args.source, args.name, args.share_memory, **_prefetch_fields(args)
        )
        _show_created(doc, args.json)
        return 0
    if args.microvm:
        if args.mem_file or args.snapshot:
            raise PageforkError("--microvm takes no --mem-file or --snapshot")
        kind = "kvm"
        if args.mem_size is not None:
            fields["mem_size_mib"] = args.mem_size
        if args.vcpus is not None:
            fields["vcpus"] = args.vcpus
    else:
        if not args.mem_file or not args.snapshot:
            raise PageforkError("give --mem-file and --snapshot, or --microvm")
        kind = "firecracker"
        fields.update(mem_file=os.path.abspath(args.mem_file))
        fields.update(snapshot_path=os.path.abspath(args.snapshot))
        if args.page_size is not None:
            fields["page_size"] = args.page_size
        if args.copy:
            fields["copy"] = True
    fields.update(_prefetch_fields(args))
    _show_created(_client(args).create_template(args.id, kind, **fields), args.json)
    return 0


def _show_created(doc: dict[str, Any], as_json: bool) -> None:
    """A new template; a ``note`` (KSM is off) goes to stderr in one line."""
    note = doc.pop("note", None) if not as_json else None
    _show(doc, as_json)
    if note:
        print(f"pagefork: {note}", file=sys.stderr)


def run_templates_delete(args: argparse.Namespace) -> int:
    """``templates delete ID``."""
    _client(args).delete_template(args.id)
    if args.json:
        _print_json({"deleted": args.id})
    else:
        print(f"deleted template {safe(args.id)}")
    return 0


def run_templates_rerecord(args: argparse.Namespace) -> int:
    """``templates rerecord ID``."""
    _client(args).rerecord(args.id)
    if args.json:
        _print_json({"template": args.id, "rerecord": True})
    else:
        print(f"the next fork of {safe(args.id)} records a new hot set")
    return 0


def run_templates_flatten(args: argparse.Namespace) -> int:
    """``templates flatten ID``."""
    doc = _client(args).flatten(args.id)
    if args.json:
        _print_json(doc)
    else:
        print(f"flattened template {safe(args.id)} into {safe(doc['mem_file'])}")
    return 0


def run_forks_list(args: argparse.Namespace) -> int:
    """``forks list``: with ``--json``, ``{"forks": [...]}`` as the API answers (an object,
    like ``templates list --json``)."""
    forks = _client(args).forks()
    if args.json:
        _print_json({"forks": forks})
        return 0
    table = _table("fork", "template", "state", "role", "driver", "pid", "socket")
    for f in forks:
        table.add_row(
            cell(f["fork"]),
            cell(f["template"]),
            cell(f.get("state", f.get("phase", "-"))),
            cell(f["role"]),
            cell(f["driver"] or "-"),
            str(f["pid"] or "-"),
            cell(f["socket"]),
        )
    _console().print(table)
    return 0


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PageforkError(f"--option {pair!r}: use KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except (ValueError, RecursionError):
            options[key] = value
    return options


def run_forks_create(args: argparse.Namespace) -> int:
    """``forks create TEMPLATE``."""
    doc = _client(args).create_fork(
        args.template,
        args.fork_id,
        args.vmm,
        _parse_options(args.option),
        args.prefetch_policy,
        args.prefetch_head,
    )
    if args.json:
        _print_json(doc)
    else:
        print(f"{safe(doc['fork'])} {safe(doc['socket'])}")
    return 0


def run_forks_show(args: argparse.Namespace) -> int:
    """``forks show ID``."""
    doc = _client(args).fork(args.id)
    if not args.json:
        stats = doc.pop("stats")
        doc.update({k: stats[k] for k in ("faults", "prefetched_pages", "misses")})
        doc["session"] = stats["state"]
        doc["latency_us"] = stats["latency_us"]
        memory = doc.pop("memory", None)
        if memory:
            doc.update(
                {
                    f"memory {k.removesuffix('_bytes')}": f"{memory[k] / (1 << 20):.1f} MiB"
                    for k in ("rss_bytes", "pss_bytes", "private_bytes", "shared_bytes")
                }
            )
            doc["memory guest_pss"] = f"{memory['guest_pss_bytes'] / (1 << 20):.1f} MiB"
            if memory.get("ksm_merging_pages") is not None:
                doc["ksm merging pages"] = memory["ksm_merging_pages"]
    _show(doc, args.json)
    return 0


def run_forks_snapshot(args: argparse.Namespace) -> int:
    """``forks snapshot ID --as NAME``."""
    doc = _client(args).snapshot_fork(args.id, args.template, release=args.release)
    if args.json:
        _print_json(doc)
    else:
        print(
            f"template {safe(args.template)}: {doc['changed_pages']} pages changed, "
            f"{doc['zero_pages']} zero, layer {doc['layer_bytes']} bytes, "
            f"{doc['seconds'] * 1000:.0f} ms; fork {safe(args.id)} "
            + ("released" if args.release else "resumed")
        )
    return 0


def run_forks_delete(args: argparse.Namespace) -> int:
    """``forks release ID`` (also ``forks delete ID``)."""
    doc = _client(args).release_fork(args.id)
    if args.json:
        _print_json(doc)
    else:
        print(f"released fork {safe(args.id)}")
    return 0
