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
