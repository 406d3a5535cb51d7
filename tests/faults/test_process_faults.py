"""The training process killed or interrupted: nothing hangs, nothing is left behind."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.parametrize("kind", ["pool", "ring"])
def test_main_process_sigkilled(scenario, kind):
    """SIGKILL of the training process while it holds batches (with the pool,
    the workers are waiting for a free segment): the workers follow within
    torch's 5 s parent check (+ the 2 s arena_timeout), and no /dev/shm entry
    or process survives."""
    report = scenario("main_killed", kind, timeout=60, settle=15)
    assert report.rc == -9 and not report.timed_out, report.describe()
    assert "@@DYING" in report.stdout
    report.assert_clean(settle_within=10.0)


@pytest.mark.parametrize("kind", ["pool", "ring"])
def test_ctrl_c(scenario, kind):
    """Ctrl-C (SIGINT to the process group) mid-epoch: the program ends with
    KeyboardInterrupt and nothing else, and leaves nothing behind."""
    report = scenario("ctrl_c", kind, timeout=60)
    assert not report.timed_out, report.describe()
    assert "@@NOT-INTERRUPTED" not in report.stdout, report.describe()
    assert report.rc in (-2, 130), report.describe()
    assert report.stderr.rstrip().splitlines()[-1].startswith("KeyboardInterrupt"), report.describe()
    # Only the interrupt's own traceback (plus, rarely, the one Python prints
    # for an interrupt it swallowed inside a garbage-collector callback).
    assert report.stderr.count("Traceback") <= 1 + report.stderr.count("Exception ignored in"), report.describe()
    assert "Error" not in report.stderr.replace("KeyboardInterrupt", ""), report.describe()
    report.assert_clean()


@pytest.mark.parametrize("kind", ["pool", "elastic", "ring"])
def test_gc_reentry_does_not_deadlock(scenario, kind):
    """An abandoned iterator collected inside one of this thread's arena calls
    defers returning its dead workers' units instead of deadlocking."""
    report = scenario("gc_reentry", kind, timeout=30)
    report.assert_ok()
    report.assert_clean()
    assert report.result["deferred"] == [2**22 + 12345]
    assert report.result["later"] == []


@pytest.mark.parametrize("kind", ["pool", "elastic", "ring"])
def test_interrupt_storm(scenario, kind):
    """KeyboardInterrupt at random moments, caught each time (a notebook cell
    interrupted and run again): no hang, no unit leaked, a clean epoch after."""
    report = scenario("interrupt_storm", kind, "6", timeout=30)
    if report.timed_out:
        # Known, torch's and not the arena's: a KeyboardInterrupt inside
        # multiprocessing.Queue.put (torch's index queue, _try_put_index) can
        # leave the queue's internal lock held, and the next put hangs; stock
        # torch does the same. Anything else (a leaked unit) fails below.
        pytest.xfail("interrupt inside torch's index-queue put left its lock held")
    report.assert_ok()
    report.assert_clean()
    res = report.result
    assert res["clean_epoch_ok"]
    assert not any(res["leaked_per_round"]), res
    assert res["after"]["units_in_use"] == 0
