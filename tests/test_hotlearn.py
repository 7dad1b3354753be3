"""Hot sets that learn from prefetched forks' misses: the rules (pure), the loop that feeds
them, and the history kept beside the hot-page file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagefork.cli import main
from pagefork.errors import HotPageFileError
from pagefork.hotlearn import HotSetLearner, LearnPolicy, history_path, load_history
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList, load, save

P = 0x1000
BASE = [(0, i * P) for i in range(100)]


def pages(*indices: int) -> list[tuple[int, int]]:
    return [(0, i * P) for i in indices]


def test_a_page_joins_when_k_of_the_last_n_forks_missed_it() -> None:
    learner = HotSetLearner(HotPageList.from_pages(BASE), LearnPolicy(window=4, join=2))
    assert learner.observe(missed=pages(500, 501)) is None  # one fork alone adds nothing
    gen = learner.observe(missed=pages(500, 502))
    assert gen is not None and (gen.joined, gen.left, gen.size, gen.forks) == (1, 0, 101, 2)
    assert (0, 500 * P) in learner.hot and (0, 501 * P) not in learner.hot
    assert learner.hot.in_order()[:100] == HotPageList.from_pages(BASE).in_order()  # order kept
    # 502 was missed once, four forks ago by the time of the fifth: it fell out of the window.
    for _ in range(3):
        assert learner.observe(missed=pages(600 + _)) is None
    assert learner.observe(missed=pages(502)) is None
    assert [g.generation for g in learner.history()] == [1]


def test_learning_does_not_grow_on_one_off_pages() -> None:
    learner = HotSetLearner(HotPageList.from_pages(BASE), LearnPolicy(window=8, join=2))
    for fork in range(64):  # every fork misses pages no other fork ever touches
        assert learner.observe(missed=pages(*range(1000 + 10 * fork, 1010 + 10 * fork))) is None
    assert len(learner.hot) == 100 and learner.history() == []


def test_one_unusual_fork_cannot_inflate_the_set() -> None:
    policy = LearnPolicy(window=4, join=2, max_growth=0.10, per_fork=0.05)
    learner = HotSetLearner(HotPageList.from_pages(BASE), policy)
    huge = pages(*range(1000, 6000))  # faults on 50x the hot set
    learner.observe(missed=huge)
    gen = learner.observe(missed=huge)  # the same (long-lived) fork's pattern again
    # It counts only its first 5 misses (5% of 100), so at most those join.
    assert gen is not None and gen.joined == 5 and len(learner.hot) == 105
    for _ in range(10):  # more forks sharing the pattern: the set stops at 110 pages
        learner.observe(missed=pages(*range(2000, 2050)))
    assert len(learner.hot) == learner.limit == 110


def test_pages_no_recent_recording_fork_touched_leave() -> None:
    learner = HotSetLearner(HotPageList.from_pages(BASE), LearnPolicy(window=2, join=2))
    assert learner.observe(touched=pages(*range(0, 60))) is None  # window not full yet
    gen = learner.observe(touched=pages(*range(30, 90)))
    assert gen is not None and gen.left == 10 and len(learner.hot) == 90
    assert (0, 95 * P) not in learner.hot and (0, 5 * P) in learner.hot


def test_policy_refuses_a_join_that_one_fork_could_meet() -> None:
    with pytest.raises(ValueError, match="join must be between 2 and window"):
        LearnPolicy(window=4, join=1)


def test_the_loop_records_prefetched_forks_and_saves_what_it_learned(tmp_path: Path) -> None:
    hot_path = str(tmp_path / "hot.hpl")
    save(HotPageList.from_pages(BASE), hot_path)
    assert HotSetLoop.for_file(load(hot_path), hot_path).records("prefetch") is False
    assert main(["hotpages", "learn", hot_path, "--window", "3", "--join", "2"]) == 0
    loop = HotSetLoop.for_file(load(hot_path), hot_path)
    assert loop.role("a") == "prefetch" and loop.records("prefetch") and loop.records("warmup")
    assert not loop.learn_and_save("a", HotPageList.from_pages(pages(300)), hot_path)
    loop.role("b")
    assert loop.learn_and_save("b", HotPageList.from_pages(pages(300, 301)), hot_path)
    assert len(load(hot_path)) == 101 and loop.hot is not None and len(loop.hot) == 101
    history = load_history(hot_path)
    assert history is not None and history.base == 100
    assert [(g.generation, g.size, g.joined) for g in history.generations] == [(1, 101, 1)]
    # A restarted daemon goes on from the file, with the bound of the recorded size.
    again = HotSetLoop.for_file(load(hot_path), hot_path)
    assert again.learner is not None and again.learner.limit == 110


def test_hotpages_history_shows_the_generations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hot_path = str(tmp_path / "hot.hpl")
    save(HotPageList.from_pages(BASE), hot_path)
    assert main(["hotpages", "history", hot_path]) == 2
    assert "no history" in capsys.readouterr().err
    main(["hotpages", "learn", hot_path, "--window", "2", "--join", "2"])
    loop = HotSetLoop.for_file(load(hot_path), hot_path)
    for fork in ("a", "b"):
        loop.role(fork)
        loop.learn_and_save(fork, HotPageList.from_pages(pages(400)), hot_path)
    capsys.readouterr()
    assert main(["hotpages", "history", hot_path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pages"] == 101 and doc["base"] == 100 and doc["policy"]["join"] == 2
    assert [(g["generation"], g["forks"], g["joined"]) for g in doc["generations"]] == [(1, 2, 1)]
    assert main(["hotpages", "history", hot_path]) == 0
    assert "+1" in capsys.readouterr().out


def test_a_malformed_history_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hot_path = str(tmp_path / "hot.hpl")
    save(HotPageList.from_pages(BASE), hot_path)
    Path(history_path(hot_path)).write_text('{"policy": {"window": 2, "join": 5}}')
    with pytest.raises(HotPageFileError, match=r"hot\.hpl\.history\.json: not a hot-set history"):
        load_history(hot_path)
    assert main(["hotpages", "history", hot_path]) == 2
    err = capsys.readouterr().err
    assert "hot.hpl.history.json: not a hot-set history" in err and "Traceback" not in err
    assert HotSetLoop.for_file(load(hot_path), hot_path).records("prefetch") is False
