"""The suite's own rules: under ``make test`` a skip is a failure."""

from __future__ import annotations

import pytest

INNER = '''
import pytest

pytest.importorskip("no_such_module_torch_arena_test")
'''

INNER_TEST = '''
import pytest

def test_needs_a_tool():
    pytest.skip("the tool is not installed")

@pytest.mark.xfail(strict=True)
def test_known_failure():
    assert False
'''


@pytest.mark.parametrize("required", [False, True])
def test_skips_fail_only_when_everything_is_required(pytester, monkeypatch, required):
    pytester.makeconftest(open(__file__.replace("test_suite_rules.py", "conftest.py")).read())
    pytester.makepyfile(test_inner=INNER_TEST, test_module_skip=INNER)
    monkeypatch.setenv("TORCH_ARENA_REQUIRE_ALL", "1" if required else "0")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-ra")
    outcomes = result.parseoutcomes()
    if required:
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        assert outcomes.get("failed") == 1 and outcomes.get("xfailed") == 1, result.stdout.str()
        result.stdout.fnmatch_lines(["*TORCH_ARENA_REQUIRE_ALL=1*the tool is not installed*"])
        result.stdout.fnmatch_lines(["FAILED (skipped under TORCH_ARENA_REQUIRE_ALL=1*no_such_module*"])
    else:
        assert result.ret == pytest.ExitCode.OK, result.stdout.str()
        assert outcomes.get("skipped") == 2 and outcomes.get("xfailed") == 1, result.stdout.str()
        result.stdout.fnmatch_lines(["*the tool is not installed*"])


def test_only_this_runs_semaphores_count_as_leftovers():
    """Other programs' multiprocessing semaphores come and go in /dev/shm while
    the suite runs; the leftover check counts only the ones this run made."""
    import multiprocessing

    from conftest import _ours

    lock = multiprocessing.get_context("spawn").Lock()  # named until collected
    name = "sem." + lock._semlock.name.lstrip("/")
    assert _ours(name), name
    assert not _ours("sem.mp-1a2b3c4d") and not _ours("sem.mp-ta1-xyz")
    assert _ours("torch_1234_5678")  # anything else new counts


def test_a_timed_out_process_tree_is_killed_whole(tmp_path):
    """A run that times out takes its children with it (a torchrun whose rank
    hangs must not leave the ranks and their workers running)."""
    import subprocess
    import sys
    import time

    from integration_helpers import run_tree
    from torch_arena._os.sync import pid_alive

    marker = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(600)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", script], timeout=5)
    grandchild = int(marker.read_text())
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)
