"""What the CLI shows a person: one vocabulary for forks (the CLI, the API and the metrics
agree), help with descriptions and examples, output that is never cut or raw, and names shown
safely however they were made."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import StartDaemon, make_mem_file, needs_uffd
from pagefork.cli import build_parser, leaf_parsers, main
from pagefork.cli.daemon_cmd import DRIVER_OPTIONS_HELP, shown_value
from pagefork.cli.display import safe
from pagefork.errors import PageforkError, VmmError
from pagefork.testing.vmm import VmmProcess

PAGE = 4096


def _metric(text: str, name: str, template: str) -> float:
    m = re.search(rf'^{name}{{template="{template}"}} (\S+)$', text, re.MULTILINE)
    assert m, f"{name} for {template} not in the metrics"
    return float(m.group(1))


# --- one vocabulary -------------------------------------------------------------------------


@needs_uffd
def test_templates_forks_and_metrics_count_live_and_exited_forks_alike(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = start_daemon()
    ctl = ["--control", client.control_path]
    mem = make_mem_file(tmp_path / "mem", 512)
    (tmp_path / "snap").write_bytes(b"state")
    client.create_template(
        "t", "firecracker", mem_file=str(mem), snapshot_path=str(tmp_path / "snap")
    )
    client.create_fork("t", fork_id="waiting")  # no VMM yet: live
    gone = client.create_fork("t", fork_id="gone")
    vmm = VmmProcess(gone["socket"], str(mem), ("2M",))
    try:
        vmm.send(cmd="touch", pages=[[0, 0], [0, PAGE]])
    finally:
        vmm.kill()  # its VMM exits: the fork is exited, held until released
    client.wait_fork("gone", timeout=30)

    states = {f["fork"]: f["state"] for f in client.forks()}
    assert states == {"waiting": "live", "gone": "exited"}
    record = client.template("t")
    assert (record["live_forks"], record["exited_forks"]) == (1, 1)
    metrics = client.metrics()
    assert _metric(metrics, "pagefork_live_forks", "t") == 1
    assert _metric(metrics, "pagefork_exited_forks", "t") == 1

    assert main(["templates", "list", *ctl]) == 0
    out = capsys.readouterr().out
    head, row = out.splitlines()[1], next(line for line in out.splitlines() if " t " in f" {line} ")
    assert "live forks" in head and "exited forks" in head
    assert row.split()[5:7] == ["1", "1"]  # after "2 MiB" and the hot set
    assert main(["forks", "list", *ctl]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = {words[0]: words[2] for words in lines if len(words) > 3 and words[0] != "fork"}
    assert rows == {"waiting": "live", "gone": "exited"}

    assert main(["templates", "delete", "t", *ctl]) == 2
    err = capsys.readouterr().err
    assert "1 live and 1 exited forks" in err and "pagefork forks release" in err
    assert main(["forks", "release", "gone", *ctl]) == 0
    assert main(["forks", "delete", "waiting", *ctl]) == 0  # the old verb still works
    assert capsys.readouterr().out.splitlines() == ["released fork gone", "released fork waiting"]
    metrics = client.metrics()
    assert _metric(metrics, "pagefork_live_forks", "t") == 0
    assert _metric(metrics, "pagefork_exited_forks", "t") == 0
    assert main(["templates", "delete", "t", *ctl]) == 0


# --- help -----------------------------------------------------------------------------------


def _leaves() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return leaf_parsers(build_parser())


def test_every_sub_command_has_a_description_argument_help_and_examples_that_parse() -> None:
    leaves = _leaves()
    assert len(leaves) >= 18
    for path, parser in leaves:
        name = " ".join(path)
        assert parser.description, f"{name}: no description"
        for action in parser._actions:
            if not action.option_strings:
                assert action.help, f"{name}: argument {action.dest} has no help"
        text = parser.format_help()
        assert "examples:" in text, f"{name}: no example"
        shown = text.split("examples:", 1)[1].split("\n\n", 2)[1]
        commands = [line.strip() for line in shown.splitlines() if line.strip()]
        assert commands, f"{name}: an empty examples section"
        for command in commands:
            words = command.split("#")[0].split("|")[0].split()
            assert words[: 1 + len(path)] == ["pagefork", *path], command
            build_parser().parse_args(words[1:])  # exits (SystemExit) if it does not parse
        assert "``" not in text and ":class:" not in text, f"{name}: raw markup"


def _known_options(error: Exception) -> set[str]:
    m = re.search(r"known: ([a-z_, ]+)\)", str(error))
    assert m, error
    return {o.strip() for o in m.group(1).split(",")}


def test_forks_create_help_lists_every_option_each_driver_takes() -> None:
    from pagefork.vmm.firecracker import parse_options
    from pagefork.vmm.kvm.driver import KvmDriver

    listed = {
        driver: set(re.findall(r"^    ([a-z_]+)=", part, re.MULTILINE))
        for driver, part in zip(
            ("firecracker", "kvm"),
            DRIVER_OPTIONS_HELP.split("--vmm kvm"),
            strict=True,
        )
    }
    with pytest.raises(PageforkError) as fc:
        parse_options({"no_such_option": 1})
    with pytest.raises(VmmError) as kvm:
        KvmDriver().check_options({"no_such_option": 1})
    assert listed == {"firecracker": _known_options(fc.value), "kvm": _known_options(kvm.value)}
    shown = _help("forks", "create")
    assert all(f"    {option}=" in shown for options in listed.values() for option in options)


def _help(*path: str) -> str:
    return dict(_leaves())[path].format_help()


def test_the_firecracker_doubles_help_is_plain_text() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pagefork.testing.fcdouble", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--api-sock" in out and "--fc-version" in out
    assert "``" not in out and ":class:" not in out and ":meth:" not in out


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [" 2", "+2", "2 ", "\u0661", "2_0", "0", "-1", "", "auto "])
def test_workers_takes_only_ascii_digits_or_auto(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["daemon", "--state-dir", "x", "--workers", text])
    assert "--workers" in capsys.readouterr().err


def test_workers_takes_auto_and_whole_numbers() -> None:
    assert build_parser().parse_args(["daemon", "--state-dir", "x", "--workers", "2"]).workers == 2
    args = build_parser().parse_args(["daemon", "--state-dir", "x", "--workers", "auto"])
    assert args.workers == "auto"


@pytest.mark.parametrize("url", ["localhost:9000", "127.0.0.1:9000", "ftp://h", "http://", "x"])
def test_an_endpoint_url_without_http_scheme_and_host_is_one_line_naming_it(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mem = make_mem_file(tmp_path / "mem", 4)
    with pytest.raises(SystemExit):
        main(["push", "s3://bucket/t", "--mem-file", str(mem), "--endpoint-url", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{url!r} is not an http:// or https:// URL" in err[-1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    assert main(["push", "s3://bucket/t", "--mem-file", str(mem)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pagefork: error: $AWS_ENDPOINT_URL:"), err


# --- output ---------------------------------------------------------------------------------


def test_the_push_bar_counts_bytes_and_speed_in_the_same_binary_units() -> None:
    from rich.console import Console

    from pagefork.cli.push import push_progress

    clock = [0.0]
    bar = push_progress(Console(file=open("/dev/null", "w")), disable=False)  # noqa: SIM115
    bar.get_time = lambda: clock[0]  # type: ignore[method-assign]
    task = bar.add_task("push", total=64 << 20)
    for step in range(1, 5):
        clock[0] = float(step)
        bar.update(task, completed=step * (8 << 20))
    shown = [str(column(bar.tasks[0])) for column in bar.columns[2:]]
    bar.console.file.close()
    assert shown[0] == "32.0/64.0 MiB" and shown[1] == "8.0 MiB/s", shown


def test_show_prints_seconds_with_units_and_floats_to_a_few_digits() -> None:
    assert shown_value("seconds", 0.0030084680001891684) == "3.01 ms"
    assert shown_value("fetch_seconds", 2.50001) == "2.5 s"
    assert shown_value("ratio", 0.0030084680001891684) == "0.003008"
    prefetch = {"installed": 3, "seconds": 0.0030084680001891684}
    assert shown_value("prefetch", prefetch) == '{"installed": 3, "seconds": 0.003008}'


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("a\x1b]0;owned\x07b", "a\\x1b]0;owned\\x07b"), ("nul\x00", "nul\\x00"),
     ("\ud800x", "\\ud800x"), ("cr\rlf\n\x9b", "cr\\x0dlf\\x0a\\x9b"), ("é ok", "é ok")],
)  # fmt: skip
def test_names_are_shown_with_control_characters_and_surrogates_escaped(
    raw: str, shown: str
) -> None:
    assert safe(raw) == shown


@needs_uffd
def test_tables_and_show_are_never_cut_on_a_terminal_or_off_one(
    start_daemon: StartDaemon,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from pagefork.cli import daemon_cmd

    _, client = start_daemon()
    ctl = ["--control", client.control_path]
    where = tmp_path / ("a-rather-long-directory-name-" * 4)
    where.mkdir()
    mem = make_mem_file(where / "checksummed-restore+record-mem-file", 8)
    (where / "snap").write_bytes(b"state")
    client.create_template(
        "restore-and-record-template-with-a-long-id", "firecracker", mem_file=str(mem),
        snapshot_path=str(where / "snap"), name="a display name that is long " * 3,
    )  # fmt: skip
    for verb in (
        ["templates", "list"],
        ["templates", "show", "restore-and-record-template-with-a-long-id"],
    ):
        assert main([*verb, *ctl]) == 0  # off a terminal: every line whole
        out = capsys.readouterr().out
        assert str(mem) in out and "…" not in out
        assert "restore-and-record-template-with-a-long-id" in out

        def terminal() -> Console:
            return Console(
                force_terminal=True, width=80, color_system=None, highlight=False, markup=False
            )

        monkeypatch.setattr(daemon_cmd, "_console", terminal)
        assert main([*verb, *ctl]) == 0  # on an 80-column terminal: folded, not cut
        out = capsys.readouterr().out
        monkeypatch.undo()
        assert "…" not in out
        assert max(len(line) for line in out.splitlines()) <= 80
        if verb[1] == "show":  # the value column holds the whole path, over several lines
            lines = out.splitlines()
            at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["mem_file"])
            column = lines[at].index(lines[at].split()[1])
            folded = [lines[at]]
            for line in lines[at + 1 :]:
                if line[:column].strip():
                    break  # the next field
                folded.append(line)
            assert "".join(line[column:].strip() for line in folded) == str(mem)


@needs_uffd
def test_a_name_with_escapes_or_a_surrogate_is_refused_and_never_printed_raw(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagefork.daemon.client import DaemonError

    _, client = start_daemon()
    ctl = ["--control", client.control_path]
    mem = make_mem_file(tmp_path / "mem", 8)
    (tmp_path / "snap").write_bytes(b"state")
    fields = {"mem_file": str(mem), "snapshot_path": str(tmp_path / "snap")}
    for name in ("\ud800", "bell\x07", "esc\x1b[2J", "nul\x00"):
        with pytest.raises(DaemonError) as info:
            client.create_template("t", "firecracker", name=name, **fields)
        assert info.value.status == 400, info.value
    # A record written otherwise (an older version, by hand) is shown escaped, never raw.
    client.create_template("t", "firecracker", **fields)
    record = next((tmp_path / "state").rglob("template.json"))
    doc = json.loads(record.read_text())
    doc["name"] = "\x1b]0;owned\x07\x00\ud800"
    record.write_text(json.dumps(doc))
    for verb in (
        ["templates", "show", "t"],
        ["templates", "list"],
        ["templates", "show", "t", "--json"],
    ):
        assert main([*verb, *ctl]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x00" not in out and "\x07" not in out
    assert main(["templates", "show", "t", *ctl]) == 0
    assert "\\x1b]0;owned\\x07\\x00\\ud800" in capsys.readouterr().out


# --- starting the daemon ----------------------------------------------------------------------


def test_a_refused_daemon_start_leaves_no_state_directory_behind(
    start_daemon: StartDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon, client = start_daemon()
    fresh = tmp_path / "new" / "state"
    cache = tmp_path / "cache"
    args = ["daemon", "--state-dir", str(fresh), "--control", client.control_path]
    assert main([*args, "--cache-dir", str(cache)]) == 2
    assert "is in use by a live server" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not cache.exists()
    # A directory that was there is left as it was, whatever the start made in it.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes").write_text("kept")
    assert (
        main(["daemon", "--state-dir", str(tmp_path / "mine"), "--control", client.control_path])
        == 2
    )
    assert (tmp_path / "mine" / "notes").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes"]
    # And the running daemon's state directory is untouched by a refused second start.
    assert (
        main(["daemon", "--state-dir", str(daemon.registry.state_dir), "--control", "x.sock"]) == 2
    )
    assert "in use by another daemon" in capsys.readouterr().err
    assert (daemon.registry.state_dir / "daemon.lock").exists()
    assert client.templates()["templates"] == []
