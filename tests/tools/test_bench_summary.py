"""The summary the demo and ``bench`` lead with, and the targets only on request:
synthetic result rows (no configuration runs), so every figure is known."""

from __future__ import annotations

import pytest

from torch_arena._tools import bench as _bench
from torch_arena._tools import demo as _demo
from torch_arena._tools.bench import _summary
from torch_arena._tools.bench._config import COLLATED_KIND, Result


def row(kind: str, transport: str, mb_per_s: float, main: float, worker: float, peak: float, **more) -> Result:
    """A measured 32 MiB row; a tight 95 % interval unless ``more`` says otherwise."""
    fields = dict(mb_per_s_lo=mb_per_s * 0.98, mb_per_s_hi=mb_per_s * 1.02, workers=2, noise_pct=0.0)
    return Result(
        kind, 32.0, transport, batch_bytes=32 << 20, mb_per_s=mb_per_s, main_cpu_ms=main, worker_cpu_ms=worker,
        peak_pss_mb=peak, **{**fields, **more},
    )


STOCK = row("numpy", "stock", 1000, main=2.0, worker=20.0, peak=400)


def test_a_pool_four_times_stock_is_said_in_words():
    pool = row("numpy", "pool", 4000, main=0.5, worker=5.0, peak=420)
    text = _summary.sentence(pool, STOCK)
    assert text.startswith("pool: 4.0× stock's throughput for numpy batches;")
    assert "main-process CPU per batch 0.50 ms instead of 2.00 ms (-75%)" in text
    assert "worker CPU 5.00 ms instead of 20.0 ms (-75%)" in text
    assert "peak memory 420 MB instead of 400 MB (+5%)" in text
    assert "noisy" not in text  # the intervals are far apart


def test_a_row_slower_than_stock_is_said_to_be_slower():
    ring = row("numpy", "ring", 500, main=6.0, worker=5.0, peak=600)
    assert _summary.sentence(ring, STOCK).startswith("ring: slower than stock for numpy batches, 0.50× its throughput;")
    summary = _summary.format_summary([STOCK, ring])
    assert "ring: slower than stock" in summary  # the only arena: its sentence leads
    losses = summary.split("Where the arenas do not win:")[1]
    assert "Slower than stock: ring for numpy (0.50×)." in losses
    # the copy's cost in the main process is named, with why
    assert "More main-process CPU per batch than stock: ring for numpy (3.0× stock's): a ring copies" in losses
    assert "More peak memory than stock: ring for numpy (+50%)" in losses


def test_losses_name_every_figure_and_spdls_pool_but_not_wins():
    rows = [
        STOCK,
        row("numpy", "pool", 4000, main=0.5, worker=5.0, peak=380),
        row("numpy", "spdl-pool", 5000, main=0.2, worker=4.0, peak=390),
        row("numpy", "ring", 3000, main=1.0, worker=25.0, peak=500),
    ]
    summary = _summary.format_summary(rows)
    assert summary.splitlines()[0].startswith("In short (32 MiB batches, 2 workers, the loop only takes each batch;")
    assert "pool: 4.0× stock's throughput for numpy batches" in summary
    assert "spdl-pool:" not in summary  # a peer: in the table, not spoken of as torch_arena's
    losses = summary.split("Where the arenas do not win:")[1]
    assert "Slower than SPDL's pool: pool for numpy (0.80×)." in losses
    assert "More worker CPU per batch than stock: ring for numpy (+25%)." in losses
    assert "More peak memory than stock: ring for numpy (+25%)" in losses
    assert "Slower than stock" not in losses and "main-process" not in losses


def test_a_loss_within_the_noise_is_still_said_and_flagged():
    pool = row("numpy", "pool", 950, main=0.5, worker=5.0, peak=380, mb_per_s_lo=800, mb_per_s_hi=1100)
    summary = _summary.format_summary([STOCK, pool])
    assert "slower than stock for numpy batches, 0.95× its throughput (noisy: the 95% intervals overlap)" in summary
    assert "Slower than stock: pool for numpy (0.95×, noisy)." in summary


def test_a_difference_that_rounds_to_nothing_is_no_loss():
    pool = row("numpy", "pool", 999, main=0.5, worker=5.0, peak=401)
    summary = " ".join(_summary.format_summary([STOCK, pool]).split())  # wrapped lines joined
    assert "pool: 1.00× stock's throughput for numpy batches (noisy" in summary
    assert "peak memory 401 MB instead of 400 MB (0%)" in summary
    assert "Where the arenas do not win: nowhere in this run." in summary


def test_transport_names_are_never_broken_at_their_hyphen(monkeypatch):
    """Wherever the wrapping falls, ``ring-fixed`` stays one word."""
    kinds = ["bytes", "numpy", "torch", COLLATED_KIND]
    rows = [row(kind, "stock", 1000, main=2.0, worker=20.0, peak=400) for kind in kinds]
    rows += [row(kind, "ring-fixed", 900, main=10.0 + i, worker=2.0, peak=400) for i, kind in enumerate(kinds)]
    for width in range(20, 120):
        monkeypatch.setattr(_summary, "WIDTH", width)
        lines = _summary.format_summary(rows).splitlines()
        assert not any(line.endswith("ring-") for line in lines), lines


def test_every_payload_and_noise_are_summarized():
    rows = []
    for kind, speed, ring_peak in (("bytes", 20.0, 440), ("numpy", 4.0, 460), ("torch", 1.7, 480),
                                   (COLLATED_KIND, 1.6, 520)):
        stock = row(kind, "stock", 500, main=5.0, worker=30.0, peak=400, noise_pct=40.0)
        rows += [stock, row(kind, "pool", 500 * speed, main=0.5, worker=20.0, peak=410)]
        rows.append(row(kind, "ring", 400, main=6.0, worker=20.0, peak=ring_peak))
    summary = _summary.format_summary(rows)
    for said in ("20× stock's throughput for bytes batches", "4.0× stock's throughput for numpy batches",
                 "1.70× stock's throughput for tensor batches",
                 "1.60× stock's throughput for collated batches of 8 tensor samples"):
        assert said in " ".join(summary.split())  # wrapped lines joined
    joined = " ".join(summary.split())
    assert "More peak memory than stock: pool for every payload (+2%); ring for every payload (+10% to +30%): an arena keeps" in joined
    assert "Slower than stock: ring for every payload (0.80×)." in joined
    # figures in a fixed order, not in that of the transport that lost first (the pool, on memory)
    assert joined.index("Slower than stock") < joined.index("More main-process CPU") < joined.index("More peak memory")
    assert "Note: other processes used up to 40% of the machine" in joined


def test_decision_table_has_every_transport_but_the_dataset_only_row():
    rows = [STOCK, row("numpy", "pool", 4000, main=0.5, worker=5.0, peak=420),
            row("numpy", "dataset-only", 9e4, main=0.1, worker=0.1, peak=300),
            Result("numpy", 32.0, "spdl-pool", skipped="spdl.pipeline does not import")]
    table = _summary.format_decisions(rows)
    pool = next(line for line in table.splitlines() if line.startswith("numpy") and " pool " in line)
    assert pool.split() == ["numpy", "32", "pool", "4000", "4.0×", "0.50", "-75%", "5.00", "-75%", "420", "+5%"]
    assert "dataset-only" not in table and "spdl.pipeline does not import" in table


@pytest.mark.parametrize(("value", "base", "said"), [(0.5, 2.0, "-75%"), (86.0, 0.4, "215× stock's"),
                                                     (0.41, 86.2, "-99.5%"), (3.0, 1.0, "3.0× stock's"),
                                                     (1.1, 1.0, "+10%"), (313.4, 314.9, "0%"),
                                                     (1.0, 0.0, "unmeasured")])
def test_changes_read_plainly(value, base, said):
    assert _summary.change(value, base) == said


def test_report_leads_with_the_summary_and_judges_targets_only_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [STOCK, row("numpy", "pool", 4000, main=0.5, worker=5.0, peak=420)]
    text = _bench.report(rows, str(tmp_path), "r", full=False)
    assert text.startswith("In short (")
    assert "targets" not in text and "x cp2" not in text  # the full table is in the file only
    on_file = (tmp_path / "r.txt").read_text(encoding="utf-8")
    assert on_file.startswith("In short (") and "x cp2" in on_file and "targets" not in on_file
    judged = _bench.format_targets(_bench.check_targets(rows))
    text = _bench.report(rows, str(tmp_path), "r", extra=[judged])
    assert "x cp2" in text and "targets: " in text and "pool >= 5x stock MB/s, numpy 32 MiB" in text


@pytest.fixture
def no_matrix(monkeypatch):
    """``cli`` without running anything: the matrix returns these rows."""
    rows = [STOCK, row("numpy", "pool", 4000, main=0.5, worker=5.0, peak=420)]
    monkeypatch.setattr(_bench, "run_matrix", lambda configs, **_: rows)
    return rows


SMALL = ["--kinds", "numpy", "--sizes", "32", "--transports", "stock", "pool"]


def test_demo_leads_with_the_summary_and_keeps_targets_behind_the_flag(no_matrix, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert _demo.main([*SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = out[out.index("In short ("):]
    assert out.index("In short (") < out.index("payload   MiB") < out.index("measured on")
    assert "targets" not in out and "x cp2" not in report  # the full table: only in the file and with --full
    assert "pool: 4.0× stock's throughput for numpy batches" in report
    assert "--full prints it" in out and (tmp_path / "demo.png").stat().st_size > 0
    assert _demo.main([*SMALL, "--out", str(tmp_path), "--targets", "--full"]) == 0
    out = capsys.readouterr().out
    assert out.index("In short (") < out.index("x cp2") < out.index("targets: ")
    assert "MISSED pool >= 5x stock MB/s, numpy 32 MiB" in out


def test_bench_prints_the_full_table_but_targets_only_when_asked(no_matrix, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert _bench.main([*SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("In short (") < out.index("x cp2") and "targets" not in out
    assert _bench.main([*SMALL, "--out", str(tmp_path), "--targets"]) == 0
    assert "targets: 0 of 3 met" in capsys.readouterr().out
