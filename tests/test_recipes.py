"""Every recipe in the README and under ``docs/`` runs as written.

A recipe is a ``sh`` code block right after an HTML comment ``<!-- recipe NAME -->`` (or
``<!-- recipe NAME after OTHER -->``: run in a copy of the directory OTHER left behind). Each
runs with bash, ``-e`` (a command that fails fails the recipe), in an empty directory, with this
checkout's ``pagefork`` first on PATH and the project's Firecracker double standing in for
Firecracker. Each recipe's output is then checked by the function :data:`CHECKS` names for it,
so a recipe added to the docs without a check fails here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import KVM_MISSING, UFFD_MISSING

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARK = re.compile(r"<!-- recipe ([\w-]+)(?: after ([\w-]+))? -->\n```sh\n(.*?)^```", re.S | re.M)
#: Longest a recipe may run; a stuck one is killed with its whole process group.
TIMEOUT = 90


@dataclass(frozen=True)
class Recipe:
    name: str
    after: str | None
    script: str
    page: str


def _recipes() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    for page in PAGES:
        text = page.read_text()
        for m in _MARK.finditer(text):
            name, after, script = m.groups()
            assert name not in found, f"recipe {name} in both {found[name].page} and {page.name}"
            found[name] = Recipe(name, after, script, page.name)
        marks = len(re.findall(r"^<!-- recipe .*-->$", text, re.M))
        got = sum(1 for r in found.values() if r.page == page.name)
        assert marks == got, f"{page.name}: a recipe mark not followed by a sh block"
    return found


RECIPES = _recipes()


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _results(output: str) -> list[dict[str, object]]:
    """The Firecracker double's guest results a recipe printed (one JSON object a line)."""
    found = []
    for line in output.splitlines():
        if line.startswith('{"state": "done"'):
            found.append(json.loads(line))
    return found


# --- what each recipe must leave behind ---------------------------------------------------------
def check_fc_template(work: Path, out: str) -> None:
    assert (work / "mem").stat().st_size == 32 << 20
    assert json.loads((work / "vmstate").read_text())["regions"] == [32 << 20]
    assert out.split() == ["mem", "vmstate"]


def check_fc_serve(work: Path, out: str) -> None:
    results = _results(out)
    assert len(results) == 2 and all(r["bad"] == 0 and r["touched"] == 8192 for r in results)
    events = _events(work / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "listening" and kinds.count("fork_end") == 2
    (saved,) = [e for e in events if e["event"] == "hot_pages_saved"]
    (done,) = [e for e in events if e["event"] == "prefetch_done"]
    assert saved["fork"] == "fork-1" and done["fork"] == "fork-2"
    # The prefetched fork resumed with every page the warm-up touched present.
    assert done["pages"] + done["already_present"] == saved["pages"] == 8192
    ends = {e["fork"]: e for e in events if e["event"] == "fork_end"}
    assert ends["fork-1"]["errors"] == 0 and ends["fork-1"]["faults"] == 8192
    assert ends["fork-2"]["errors"] == 0 and ends["fork-2"]["prefetched_pages"] == done["pages"]
    # Its one fault is the VMGenID page Firecracker 1.8+ writes during the load, before the
    # prefetch (which then finds it present); no page was missing once it resumed.
    assert ends["fork-2"]["misses"] == 0
    assert ends["fork-2"]["faults"] == done["already_present"] == 1
    assert not (work / "pagefork.sock").exists()


def check_fc_daemon(work: Path, out: str) -> None:
    assert re.search(r"\brole\s+prefetch\b", out), out
    assert re.search(r"\bprefetched_pages\s+[1-9]", out), out
    assert not (work / "pagefork.sock").exists()


def check_takeover_serve(work: Path, out: str) -> None:
    old, new = _events(work / "old.jsonl"), _events(work / "new.jsonl")
    assert [e["event"] for e in old] == ["listening", "handed_over"]
    assert [e["event"] for e in new] == ["took_over", "listening", "fork_end"]
    assert old[1]["forks"] == new[0]["forks"] == 1
    (result,) = _results(out)
    assert result["bad"] == 0 and result["touched"] == 8192
    # Every page the guest read after the handover was served by the new process.
    assert new[2]["errors"] == 0 and new[2]["faults"] >= 8192 - 1
    assert not (work / "pagefork.sock").exists()


def check_snapshot_branch(work: Path, out: str) -> None:
    assert re.search(r"template vm-step1: [1-9]\d* pages changed", out), out
    assert re.search(r"\bparent\s+vm\b", out), out
    assert (work / "state" / "templates" / "vm-step1" / "layer.pfl").stat().st_size > 0


def check_s3_push_serve(work: Path, out: str) -> None:
    (result,) = _results(out)
    assert result["bad"] == 0 and result["touched"] == 8192
    events = _events(work / "events.jsonl")
    listening, end = events[0], events[-1]
    assert listening["mem_file"].startswith("s3://pagefork-recipes/templates/base#sha256=")
    assert listening["vmstate"] == "pagefork.sock.vmstate"
    assert end["event"] == "fork_end" and end["errors"] == 0
    assert not (work / "pagefork.sock.vmstate").exists()  # removed when serve stopped
    assert any((work / "cache").iterdir())


def check_daemon_quickstart(work: Path, out: str) -> None:
    # forks list: fork, template, state (live, or exited once its guest is done), role, driver
    assert re.search(r"\bwarm\s+vm\s+(live|exited)\s+warmup\s+kvm\b", out), out
    assert re.search(r"\bweb-1\s+vm\s+(live|exited)\s+prefetch\s+kvm\b", out), out
    assert re.search(r"\bprefetched_pages\s+[1-9]", out), out
    assert "released fork web-1" in out
    assert (work / "state" / "templates" / "vm" / "hot-pages.hpl").stat().st_size > 0
    assert not (work / "pagefork.sock").exists()


CHECKS: dict[str, Callable[[Path, str], None]] = {
    "daemon-quickstart": check_daemon_quickstart,
    "takeover-serve": check_takeover_serve,
    "snapshot-branch": check_snapshot_branch,
    "s3-push-serve": check_s3_push_serve,
    "fc-template": check_fc_template,
    "fc-serve": check_fc_serve,
    "fc-daemon": check_fc_daemon,
}
#: Recipes that need KVM (the built-in microVM), and those that need an S3 server.
NEEDS_KVM = {"daemon-quickstart", "snapshot-branch"}
NEEDS_S3 = {"s3-push-serve"}


def test_every_recipe_has_a_check() -> None:
    assert set(RECIPES) == set(CHECKS), "a recipe without a check, or a check without a recipe"
    for recipe in RECIPES.values():
        assert recipe.after is None or recipe.after in RECIPES, f"{recipe.name}: no {recipe.after}"


def test_every_link_between_the_pages_resolves() -> None:
    """The README and the pages under docs/ link to each other by relative path."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken


#: Directories that recipes left behind, by recipe name: a recipe run ``after`` another starts
#: in a copy of that directory, so the other runs once per test session.
_LEFT: dict[str, Path] = {}


def _chain(name: str) -> list[Recipe]:
    recipe = RECIPES[name]
    return (_chain(recipe.after) if recipe.after else []) + [recipe]


def _start_in(recipe: Recipe, work: Path, env: dict[str, str], keep: Path) -> None:
    """Fill ``work`` with what the recipe's ``after`` chain leaves behind."""
    if recipe.after is None:
        return
    if recipe.after not in _LEFT:
        left = keep / recipe.after
        left.mkdir()
        before = RECIPES[recipe.after]
        _start_in(before, left, env, keep)
        _run(before, left, env)
        _LEFT[recipe.after] = left
    shutil.copytree(_LEFT[recipe.after], work, dirs_exist_ok=True)


def _run(recipe: Recipe, work: Path, env: dict[str, str]) -> str:
    """Run one recipe in ``work``; its stdout. Output goes to files, not pipes, so a background
    process the recipe left running cannot hold the test up."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", recipe.script],
            cwd=work,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            code: int | str = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            code = f"timed out after {TIMEOUT} s"
        finally:
            # Whatever the recipe left running (a server it did not stop) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert code == 0, f"recipe {recipe.name} ({recipe.page}) failed ({code}):\n{stderr}\n{stdout}"
    return stdout


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_as_written(
    name: str,
    short_dir: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if UFFD_MISSING:
        pytest.skip(UFFD_MISSING)
    if name in NEEDS_KVM and KVM_MISSING:
        pytest.skip(KVM_MISSING)
    if any("curl " in r.script for r in _chain(name)) and shutil.which("curl") is None:
        pytest.skip("the recipe talks to the Firecracker double with curl, which is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGEFORK_", "AWS_"))}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if name in NEEDS_S3:
        from conftest import S3_ENV
        from pagefork.store.client import make_client

        endpoint = request.getfixturevalue("s3_endpoint")
        env.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        client = make_client(endpoint)
        if "pagefork-recipes" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket="pagefork-recipes")
    work = short_dir / "w"
    work.mkdir()
    recipe = RECIPES[name]
    _start_in(recipe, work, env, tmp_path_factory.getbasetemp())
    CHECKS[name](work, _run(recipe, work, env))
