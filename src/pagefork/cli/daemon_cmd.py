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


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        default=_control_default(),
        metavar="PATH",
        help=f"the daemon's control socket (default: $PAGEFORK_CONTROL, else {DEFAULT_CONTROL})",
    )


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
    d.add_argument("-v", "--verbose", action="store_true", help="log the fork lifecycle")
    d.set_defaults(func=run_daemon)

    t = subparsers.add_parser(
        "templates",
        help="list, show, create, delete daemon templates",
        description=f"List, show, create and delete the daemon's templates. {_FINDING_THE_DAEMON}",
    )
    tsub = t.add_subparsers(dest="templates_command", metavar="ACTION")
    tsub.required = True
    tl = tsub.add_parser("list", help="list templates")
    tl.set_defaults(func=run_templates_list)
    ts = tsub.add_parser("show", help="show one template")
    ts.add_argument("id")
    ts.set_defaults(func=run_templates_show)
    tc = tsub.add_parser(
        "create",
        help="create a template from a Firecracker snapshot, the built-in microVM, or object "
        "storage",
        description="With --mem-file and --snapshot: register a Firecracker snapshot "
        "(referenced, or copied with --copy). With --microvm: build a microVM template. With "
        "--from s3://BUCKET/PREFIX: a template pushed with 'pagefork push', served lazily.",
    )
    tc.add_argument("id")
    tc.add_argument("--name", help="a display name (default: the id)")
    tc.add_argument("--mem-file", help="Firecracker snapshot: the guest memory file")
    tc.add_argument("--snapshot", help="Firecracker snapshot: the VM state file")
    tc.add_argument("--page-size", type=int, help="Firecracker snapshot: page size in bytes")
    tc.add_argument("--copy", action="store_true", help="copy the snapshot files in")
    tc.add_argument("--microvm", action="store_true", help="build a built-in microVM template")
    tc.add_argument("--mem-size", type=int, metavar="MIB", help="microVM RAM (default 64)")
    tc.add_argument("--vcpus", type=int, help="microVM vCPUs (default 1)")
    tc.add_argument(
        "--from",
        dest="source",
        metavar="s3://BUCKET/PREFIX",
        help="a template pushed with 'pagefork push': served lazily from the store (its "
        "vmstate and hot set come with it)",
    )
    tc.set_defaults(func=run_templates_create)
    td = tsub.add_parser("delete", help="delete a template (refused while forks are live)")
    td.add_argument("id")
    td.set_defaults(func=run_templates_delete)
    tr = tsub.add_parser("rerecord", help="make the next fork record a new hot set")
    tr.add_argument("id")
    tr.set_defaults(func=run_templates_rerecord)
    tf = tsub.add_parser(
        "flatten",
        help="merge a child template's layers into one mem-file (it then needs no parent)",
    )
    tf.add_argument("id", help="the template to flatten")
    tf.set_defaults(func=run_templates_flatten)

    f = subparsers.add_parser(
        "forks",
        help="list, create, show, delete daemon forks",
        description=f"List, create, show and release the daemon's forks. {_FINDING_THE_DAEMON}",
    )
    fsub = f.add_subparsers(dest="forks_command", metavar="ACTION")
    fsub.required = True
    fl = fsub.add_parser("list", help="list live forks")
    fl.set_defaults(func=run_forks_list)
    fc = fsub.add_parser(
        "create",
        help="create a fork; prints its id and uffd socket",
        description="Register a fork of TEMPLATE. With --vmm the daemon restores, prefetches "
        "and resumes the VMM itself; otherwise point your VMM at the printed socket.",
    )
    fc.add_argument("template")
    fc.add_argument("--id", dest="fork_id", help="the fork id (default: generated)")
    fc.add_argument("--vmm", help="VMM driver to start the fork with (firecracker, kvm)")
    fc.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a driver option (VALUE parsed as JSON when it can be); repeatable",
    )
    fc.set_defaults(func=run_forks_create)
    fs = fsub.add_parser("show", help="show a fork and its counters")
    fs.add_argument("id")
    fs.set_defaults(func=run_forks_show)
    fd = fsub.add_parser("delete", help="release a fork")
    fd.add_argument("id")
    fd.set_defaults(func=run_forks_delete)
    fsn = fsub.add_parser(
        "snapshot",
        help="snapshot a fork into a child template of its own template",
        description="Pause the fork's VMM, register the memory it changed as template NAME "
        "(a layer over the fork's template), then resume the fork, or release it with "
        "--release. The fork must have been created with --vmm and --option snapshots=true.",
    )
    fsn.add_argument("id", help="the fork to snapshot")
    fsn.add_argument("--as", dest="template", required=True, metavar="NAME", help="new template")
    fsn.add_argument("--release", action="store_true", help="release the fork afterwards")
    fsn.set_defaults(func=run_forks_snapshot)
    for p in (tl, ts, tc, td, tr, tf, fl, fc, fs, fd, fsn):
        p.epilog = _FINDING_THE_DAEMON
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
    # SIGHUP (its terminal or supervisor went away) stops it cleanly too, like SIGTERM, unless
    # --on-sighup takeover; one that is ignored on entry (nohup) stays ignored: that caller
    # asked it to outlive them.
    from pagefork.daemon.main import serve_daemon
    from pagefork.signals import SignalInbox

    store = store_options(args, os.path.join(args.state_dir, "chunk-cache"))
    with SignalInbox(
        (signal.SIGINT, signal.SIGTERM, signal.SIGHUP), keep_ignored=(signal.SIGHUP,)
    ) as inbox:
        serve_daemon(args, inbox, store)
    return 0


# --- verbs -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from pagefork.daemon.client import DaemonClient

    return DaemonClient(args.control)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def _console() -> Console:
    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, 120)
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def run_templates_list(args: argparse.Namespace) -> int:
    """``templates list``."""
    doc = _client(args).templates()
    if args.json:
        _print_json(doc)
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("id", "kind", "memory", "hot set", "live forks", "mem-file"):
        table.add_column(col)
    for t in doc["templates"]:
        table.add_row(
            t["id"],
            t["kind"],
            _mib(t["mem_size"]),
            "yes" if t["has_hot_pages"] else "no",
            str(t["live_forks"]),
            t["mem_file"],
        )
    out = _console()
    out.print(table)
    for err in doc["errors"]:
        out.print(f"[red]broken:[/] {err}")
    return 0


def run_templates_show(args: argparse.Namespace) -> int:
    """``templates show ID``."""
    _show(_client(args).template(args.id), args.json)
    return 0


#: Fields holding seconds since the epoch, shown as local dates.
_TIMESTAMPS = frozenset({"created", "last_used"})


def _show(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(doc)
        return
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in doc.items():
        if key in _TIMESTAMPS and isinstance(value, (int, float)):
            text = datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
        else:
            text = str(value)
        table.add_row(key, text)
    _console().print(table)


def run_templates_create(args: argparse.Namespace) -> int:
    """``templates create ID (--mem-file F --snapshot S | --microvm)``."""
    fields: dict[str, Any] = {}
    if args.name:
        fields["name"] = args.name
    if args.source:
        if args.microvm or args.mem_file or args.snapshot:
            raise PageforkError("--from takes no --microvm, --mem-file or --snapshot")
        _show(_client(args).create_template_from(args.id, args.source, args.name), args.json)
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
    _show(_client(args).create_template(args.id, kind, **fields), args.json)
    return 0


def run_templates_delete(args: argparse.Namespace) -> int:
    """``templates delete ID``."""
    _client(args).delete_template(args.id)
    if args.json:
        _print_json({"deleted": args.id})
    else:
        print(f"deleted template {args.id}")
    return 0


def run_templates_rerecord(args: argparse.Namespace) -> int:
    """``templates rerecord ID``."""
    _client(args).rerecord(args.id)
    if args.json:
        _print_json({"template": args.id, "rerecord": True})
    else:
        print(f"the next fork of {args.id} records a new hot set")
    return 0


def run_templates_flatten(args: argparse.Namespace) -> int:
    """``templates flatten ID``."""
    doc = _client(args).flatten(args.id)
    if args.json:
        _print_json(doc)
    else:
        print(f"flattened template {args.id} into {doc['mem_file']}")
    return 0


def run_forks_list(args: argparse.Namespace) -> int:
    """``forks list``."""
    forks = _client(args).forks()
    if args.json:
        _print_json(forks)
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("fork", "template", "role", "driver", "pid", "socket"):
        table.add_column(col)
    for f in forks:
        table.add_row(
            f["fork"],
            f["template"],
            f["role"],
            f["driver"] or "-",
            str(f["pid"] or "-"),
            f["socket"],
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
        except ValueError:
            options[key] = value
    return options


def run_forks_create(args: argparse.Namespace) -> int:
    """``forks create TEMPLATE``."""
    doc = _client(args).create_fork(
        args.template, args.fork_id, args.vmm, _parse_options(args.option)
    )
    if args.json:
        _print_json(doc)
    else:
        print(f"{doc['fork']} {doc['socket']}")
    return 0


def run_forks_show(args: argparse.Namespace) -> int:
    """``forks show ID``."""
    doc = _client(args).fork(args.id)
    if not args.json:
        stats = doc.pop("stats")
        doc.update({k: stats[k] for k in ("state", "faults", "prefetched_pages", "misses")})
        doc["latency_us"] = stats["latency_us"]
    _show(doc, args.json)
    return 0


def run_forks_snapshot(args: argparse.Namespace) -> int:
    """``forks snapshot ID --as NAME``."""
    doc = _client(args).snapshot_fork(args.id, args.template, release=args.release)
    if args.json:
        _print_json(doc)
    else:
        print(
            f"template {args.template}: {doc['changed_pages']} pages changed, "
            f"{doc['zero_pages']} zero, layer {doc['layer_bytes']} bytes, "
            f"{doc['seconds'] * 1000:.0f} ms; fork {args.id} "
            + ("released" if args.release else "resumed")
        )
    return 0


def run_forks_delete(args: argparse.Namespace) -> int:
    """``forks delete ID``."""
    doc = _client(args).release_fork(args.id)
    if args.json:
        _print_json(doc)
    else:
        print(f"released fork {args.id}")
    return 0
