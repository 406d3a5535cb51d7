"""Reporting: the full table, CSV, the figure and the report that puts them together."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._config import (
    ALL_TRANSPORTS,
    DATASET_ONLY,
    KINDS,
    RING_FIXED,
    SPDL,
    WORKERS,
    Result,
)
from ._summary import format_decisions, format_summary

# -- reporting ----------------------------------------------------------------------


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _speedups(results: Sequence[Result]) -> dict[tuple[str, float, str], float]:
    stock = {r.key: r.mb_per_s for r in results if r.transport == "stock" and not r.skipped}
    return {
        (*r.key, r.transport): r.mb_per_s / stock[r.key]
        for r in results
        if not r.skipped and r.key in stock and stock[r.key] and r.transport != DATASET_ONLY
    }


def format_table(results: Sequence[Result]) -> str:
    """The A/B table: one line per configuration."""
    speed = _speedups(results)
    head = (
        f"{'kind':<9}{'MiB':>4} {'transport':<13}{'MB/s':>7} {'95% CI':>13} {'x stock':>7} "
        f"{'main ms':>8} {'wrk ms':>7} {'data ms':>8} {'xfer ms':>8} {'x cp':>5} {'x cp2':>5} "
        f"{'read ms':>8} {'peak MB':>8} {'fb':>3} {'noise':>5}"
    )
    lines = [head, "-" * len(head)]
    order = {t: i for i, t in enumerate(ALL_TRANSPORTS)}
    kinds = {k: i for i, k in enumerate(KINDS)}
    for r in sorted(results, key=lambda r: (kinds.get(r.kind, 99), r.size_mib, order.get(r.transport, 99))):
        if r.skipped:
            lines.append(f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<13}{r.skipped}")
            continue
        ci = f"{r.mb_per_s_lo:.0f}-{r.mb_per_s_hi:.0f}"
        lines.append(
            f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<13}{r.mb_per_s:>7.0f} {ci:>13} "
            f"{_fmt(speed.get((*r.key, r.transport), float('nan')), '.2f'):>7} "
            f"{r.main_cpu_ms:>8.2f} {r.worker_cpu_ms:>7.1f} {_fmt(r.dataset_ms, '.1f'):>8} "
            f"{_fmt(r.worker_xfer_ms, '.1f'):>8} {_fmt(r.xfer_memcpy_ratio, '.2f'):>5} "
            f"{_fmt(r.worker_xfer_ms / r.memcpy_shared_ms if r.memcpy_shared_ms else float('nan'), '.2f'):>5} "
            f"{r.touch_ms:>8.2f} {_fmt(r.peak_pss_mb, '.0f'):>8} {r.fallbacks:>3} {_fmt(r.noise_pct, '.0f'):>4}%"
        )
    measured = [r for r in results if not r.skipped and r.memcpy_ms]
    if measured:
        alone = [r.memcpy_gbps for r in measured]
        shared = [r.batch_bytes / r.memcpy_shared_ms / 1e6 for r in measured]
        lines.append(
            f"memcpy (np.copyto into pre-faulted memory, measured in every config): median "
            f"{statistics.median(alone):.1f} GB/s alone (range {min(alone):.1f}-{max(alone):.1f}), "
            f"{statistics.median(shared):.1f} GB/s per core while "
            f"{min(max(r.workers for r in measured) or WORKERS, os.cpu_count() or 1)} cores copy at once"
        )
    lines.append(
        "per batch: main = main-process CPU (all threads); wrk = CPU of all worker processes; "
        "data = wrk of the dataset-only run (making the payload); xfer = wrk - data; "
        "x cp = xfer / one memcpy of the batch; x cp2 = xfer / one memcpy while both cores "
        "copy; read = the main loop reading one byte per page of the batch (--touch; part of main); "
        "peak MB = peak memory of the process tree (PSS + shared-memory files, each "
        "page once); fb = arena fallbacks; noise = CPU used by other processes meanwhile, "
        "% of the machine"
    )
    return "\n".join(lines)


def _lookup(results: Sequence[Result]) -> dict[tuple[str, float, str], Result]:
    return {(*r.key, r.transport): r for r in results if not r.skipped}


def write_csv(results: Sequence[Result], path: str) -> None:
    """One row per configuration, one column per :class:`Result` field."""
    names = [f.name for f in dataclasses.fields(Result)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in results:
            writer.writerow(dataclasses.asdict(r))


def read_csv(path: str) -> list[Result]:
    """Results written by :func:`write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(Result)}
    convert = {"str": str, "int": int, "float": float}
    with open(path, newline="") as f:
        return [Result(**{k: convert[types[k]](v) for k, v in row.items()}) for row in csv.DictReader(f)]


_COLORS = {"stock": "#9e9e9e", "ring": "#f0a030", RING_FIXED: "#d95f02", "pool": "#2a7ab9", SPDL: "#6a3d9a"}


def plot(results: Sequence[Result], path: str, title: str = "") -> None:
    """One row per payload kind; columns throughput / CPU per batch / peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if not r.skipped and r.transport in _COLORS]
    kinds = [k for k in KINDS if any(r.kind == k for r in shown)]
    if not kinds:
        return
    by = _lookup(shown)
    transports = [t for t in _COLORS if any(r.transport == t for r in shown)]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(13, 2.7 * len(kinds) + 0.8), squeeze=False)
    width = 0.8 / len(transports)
    for row, kind in enumerate(kinds):
        sizes = sorted({r.size_mib for r in shown if r.kind == kind})
        for j, transport in enumerate(transports):
            xs, mbs, err, main, work, mem = [], [], [], [], [], []
            for i, size in enumerate(sizes):
                r = by.get((kind, size, transport))
                if r is None:
                    continue
                per_gb = 1e9 / r.batch_bytes / 1e3  # ms per batch -> s per GB moved
                xs.append(i + (j - (len(transports) - 1) / 2) * width)
                mbs.append(r.mb_per_s)
                err.append(max(0.0, r.mb_per_s - r.mb_per_s_lo))
                main.append(r.main_cpu_ms * per_gb)
                work.append(r.worker_cpu_ms * per_gb)
                mem.append(r.peak_pss_mb)
            color = _COLORS[transport]
            axes[row, 0].bar(xs, mbs, width, yerr=err, color=color, label=transport, capsize=2)
            axes[row, 1].bar(xs, work, width, color=color, alpha=0.55)
            axes[row, 1].bar(xs, main, width, bottom=work, color=color, hatch="///", edgecolor="k", lw=0)
            axes[row, 2].bar(xs, mem, width, color=color)
        for col, ylabel in enumerate(("MB/s (higher is better)", "CPU s per GB moved", "peak memory MB")):
            ax = axes[row, col]
            ax.set_xticks(range(len(sizes)), [f"{s:g} MiB" for s in sizes])
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[row, 0].set_title(kind, loc="left", fontweight="bold")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    axes[0, 1].set_title("CPU: workers (light) + main process (hatched)", fontsize=9)
    axes[0, 2].set_title("peak memory of the process tree (PSS + shm files)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _runs_line(runs: Sequence[Any]) -> str:
    """``2 workers, start method fork``: what the runs (results or configs) used."""
    workers = sorted({r.workers for r in runs if getattr(r, "workers", 0)})
    methods = sorted({m for r in runs if (m := getattr(r, "start_method", ""))})
    parts = []
    if workers:
        count = f"{workers[0]}" if len(workers) == 1 else f"{workers[0]}-{workers[-1]}"
        parts.append(f"{count} worker{'s' if workers[-1] != 1 else ''}")
    if methods:
        parts.append(f"start method {'/'.join(methods)}")
    return ", ".join(parts)


def machine_line(runs: Sequence[Any] = ()) -> str:
    """Cores, CPU model and library versions, and the workers and start method
    ``runs`` (results or configs) used, for the report."""
    import platform

    import torch

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    line = (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )
    runs_line = _runs_line(runs)
    return f"{line}, {runs_line}" if runs_line else line


def report(
    results: Sequence[Result],
    out_dir: str,
    name: str,
    notes: Sequence[str] = (),
    table: Callable[[Sequence[Result]], str] = format_table,
    *,
    full: bool = True,
    extra: Sequence[str] = (),
) -> str:
    """Write ``<name>.csv``, ``<name>.png`` and ``<name>.txt`` under ``out_dir``;
    return the text to print.

    It leads with what a user decides on (the summary and the per-payload
    table of :mod:`._summary`) and the machine, then the full table (only with
    ``full``; the .txt file always holds it: the figures behind the summary
    should never be more than a file away), then ``extra`` (the targets, where
    asked for) and the notes.
    """
    os.makedirs(out_dir, exist_ok=True)
    lead = [format_summary(results), "", format_decisions(results), f"measured on {machine_line(results)}"]
    tail = [*extra, *notes]
    write_csv(results, os.path.join(out_dir, f"{name}.csv"))
    with open(os.path.join(out_dir, f"{name}.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join([*lead, "", table(results), *tail]) + "\n")
    plot(results, os.path.join(out_dir, f"{name}.png"), title=machine_line(results))
    return "\n".join([*lead, *(["", table(results)] if full else []), *tail])
