"""The sizing benchmark's report: tables, the issue's targets, CSVs and the figure."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

from ._config import MiB
from ._report import _fmt, machine_line
from ._sizing import RING, TRANSPORTS

Check = tuple[str, bool, str]


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("skipped")]


def matrix_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (size, transport)."""
    head = (
        f"{'batch':<8} {'transport':<8}{'fb':>4} {'MB/s':>7} {'±95%':>6} {'main ms':>8} {'wrk ms':>8} "
        f"{'x cp':>5} {'x cp2':>5} {'1st cpu':>8} {'1st wall':>8} {'held MiB':>9} {'commit MiB':>10} "
        f"{'limit':>7} {'x lim':>5} {'peak MB':>8} {'noise':>5}"
    )
    lines = [head, "-" * len(head)]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    order = {t: i for i, t in enumerate((*TRANSPORTS, RING))}
    for r in sorted(rows, key=lambda r: (sizes.index(r["size"]), order.get(r["transport"], 9))):
        if r.get("skipped"):
            lines.append(f"{r['size']:<8} {r['transport']:<8}{r['skipped']}")
            continue
        lines.append(
            f"{r['size']:<8} {r['transport']:<8}{r['fallbacks']:>4} {r['mb_per_s']:>7.0f} {r['mb_per_s_ci']:>6.0f} "
            f"{r['main_cpu_ms']:>8.3f} {r['worker_cpu_ms']:>8.2f} {_fmt(r['x_memcpy'], '.2f'):>5} "
            f"{_fmt(r['x_memcpy2'], '.2f'):>5} {r['first_cpu_ms']:>8.1f} {r['first_wall_ms']:>8.1f} "
            f"{_fmt(r['held_peak_mib'], '.1f'):>9} {_fmt(r['committed_peak_mib'], '.1f'):>10} "
            f"{_fmt(r['committed_limit_mib'], '.1f'):>7} {_fmt(r['committed_x_limit'], '.2f'):>5} "
            f"{_fmt(r['peak_pss_mb'], '.0f'):>8} {_fmt(r['noise_pct'], '.0f'):>4}%"
        )
    lines.append(
        "per batch: fb = fallbacks; main/wrk = CPU of the main process / all workers; x cp = wrk / one "
        "memcpy of the batch (alone), x cp2 = / one memcpy while both cores copy; 1st = main-process "
        "CPU and wall ms from building the loader (and a fixed pool) to the first batch; held = peak bytes in flight + held (the arena's "
        "high-water mark); commit = peak committed memory; limit = 1.25 x held + 16 MiB; peak MB = "
        "process tree (PSS + shared-memory files)"
    )
    return "\n".join(lines)


def _by(rows: Sequence[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in _ok(rows):
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _median(rows: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows) if rows else float("nan")


def epoch_tables(results: dict[str, Any]) -> str:
    """Start-up, keep-every-batch and per-epoch committed memory."""
    lines = []
    if results.get("startup"):
        lines.append("start-up included (one epoch from building the loader to its end; median of reps, MB/s per rep):")
        for (case, transport), rs in sorted(_by(results["startup"], "case", "transport").items()):
            each = " ".join(f"{r['mb_per_s']:.0f}" for r in rs)
            lines.append(
                f"  {case:<9} {transport:<8} {_median(rs, 'mb_per_s'):>7.0f} MB/s  wall {_median(rs, 'wall_s'):.2f} s  "
                f"main {_median(rs, 'main_cpu_ms'):.0f} ms  fb {max(r['fallbacks'] for r in rs)}  [{each}]"
            )
    if results.get("keep"):
        lines.append("keep every batch (list(loader), 24 x 32 MiB):")
        for r in _ok(results["keep"]):
            lines.append(
                f"  {r['transport']:<8} fb {r['fallbacks']:>2}/{r['batches']}  longest producer wait "
                f"{r['max_wait_s']:.3f} s  all waits {r['wait_s']:.3f} s  longest gap in the loop "
                f"{r['max_gap_s']:.3f} s  epoch {r['wall_s']:.2f} s  committed peak "
                f"{r['committed_high_water'] / MiB:.0f} MiB (held {r['bytes_high_water'] / MiB:.0f} MiB)"
            )
    for r in _ok(results.get("epochs", [])):
        series = " ".join(f"{e['committed_after'] / MiB:.0f}" for e in r["epochs"])
        peaks = " ".join(
            f"{e['committed_high_water'] / MiB:.0f}/{e['bytes_high_water'] / MiB:.0f}" for e in r["epochs"]
        )
        fb = sum(e["fallbacks"] for e in r["epochs"][-1:])
        lines.append(f"{r['case']:<6} {r['transport']:<8} committed MiB after each epoch: {series}  (fallbacks {fb})")
        lines.append(f"{'':<15} peak committed / peak held MiB by then: {peaks}")
    return "\n".join(lines)


def pipeline_table(rows: Sequence[dict[str, Any]]) -> str:
    """Median over repetitions, per pipeline and transport, under a line that
    names the decoder that ran (rows from before it was recorded: PIL)."""
    decoders = sorted({r.get("decoder", "PIL") for r in _ok(rows)})
    head = (
        f"{'pipeline':<8} {'transport':<8}{'steps/s':>8} {'x stock':>7} {'main ms':>8} {'step ms':>8} "
        f"{'read ms':>8} {'overhead':>8} {'x stock':>7} {'wrk ms':>7} {'fb':>3}  steps/s per rep"
    )
    lines = [f"JPEG decode and transforms: {', '.join(decoders) or 'none ran'}", head, "-" * len(head)]
    groups = _by(rows, "pipeline", "transport")
    for (pipeline, transport), rs in groups.items():
        stock = groups.get((pipeline, "stock"), [])
        sps, over = _median(rs, "steps_per_s"), _median(rs, "overhead_ms")
        lines.append(
            f"{pipeline:<8} {transport:<8}{sps:>8.2f} {sps / _median(stock, 'steps_per_s'):>7.2f} "
            f"{_median(rs, 'main_cpu_ms'):>8.2f} {_median(rs, 'step_ms'):>8.2f} {_median(rs, 'read_ms'):>8.2f} "
            f"{over:>8.2f} {over / _median(stock, 'overhead_ms'):>7.2f} {_median(rs, 'worker_cpu_ms'):>7.0f} "
            f"{max(r['fallbacks'] for r in rs):>3}  " + " ".join(f"{r['steps_per_s']:.2f}" for r in rs)
        )
    lines.append(
        "per step: main = main-process CPU; step = the training step's own CPU (sum of the batch, "
        "a small conv); read = reading one byte per page first (page faults of fresh mappings); "
        "overhead = main - step: what the loader costs the training process; wrk = worker CPU"
    )
    return "\n".join(lines)


def _fit_checks(r: dict[str, Any], prefix: str = "") -> list[Check]:
    """0 fallbacks, and committed memory against the bytes in flight + held, of one matrix row."""
    size = r["size"]
    private = ""
    if "private_kept" in r:  # copy-out: what the training process keeps in private buffers
        private = f"; private buffers kept {r['private_kept'] / MiB:.1f} MiB at the end"
    return [
        (f"{prefix}0 fallbacks, {size}", r["fallbacks"] == 0, f"{r['fallbacks']} of {r['batches']}+"),
        (
            f"{prefix}committed <= 1.25 x held + 16 MiB, {size}",
            r["committed_x_limit"] <= 1.0,
            f"{r['committed_peak_mib']:.1f} MiB vs limit {r['committed_limit_mib']:.1f} "
            f"(held {r['held_peak_mib']:.1f}) = {r['committed_x_limit']:.2f}x{private}",
        ),
    ]


def check_targets(results: dict[str, Any]) -> list[Check]:
    """The issue's targets that these results can judge."""
    checks: list[Check] = []
    m = {(r["size"], r["transport"]): r for r in _ok(results.get("matrix", []))}
    for (size, transport), r in m.items():
        if transport == RING:
            checks += _fit_checks(r, f"{RING} ")
        if transport != "elastic":
            continue
        checks += _fit_checks(r)
        stock, fixed = m.get((size, "stock")), m.get((size, "fixed"))
        if stock:
            extra = r["first_cpu_ms"] - stock["first_cpu_ms"]
            checks.append(
                (
                    f"main CPU to 1st batch <= stock + 10 ms, {size}",
                    extra <= 10,
                    f"{r['first_cpu_ms']:.1f} vs {stock['first_cpu_ms']:.1f} ms (fixed "
                    f"{fixed['first_cpu_ms'] if fixed else float('nan'):.1f})",
                )
            )
        if fixed and fixed["fallbacks"] == 0:
            slower = r["mb_per_s"] + r["mb_per_s_ci"] < fixed["mb_per_s"] - fixed["mb_per_s_ci"]
            checks.append(
                (
                    f"MB/s no worse than the fixed pool (CIs overlap), {size}",
                    not slower,
                    f"{r['mb_per_s']:.0f}±{r['mb_per_s_ci']:.0f} vs {fixed['mb_per_s']:.0f}±{fixed['mb_per_s_ci']:.0f}",
                )
            )
            checks.append(
                (
                    f"main CPU/batch <= fixed pool's x 1.1 + 0.05 ms, {size}",
                    r["main_cpu_ms"] <= fixed["main_cpu_ms"] * 1.1 + 0.05,
                    f"{r['main_cpu_ms']:.3f} vs {fixed['main_cpu_ms']:.3f} ms",
                )
            )
        if fixed:
            checks.append(
                (
                    f"worker CPU/batch <= fixed pool's x 1.1 + 0.05 ms, {size}",
                    r["worker_cpu_ms"] <= fixed["worker_cpu_ms"] * 1.1 + 0.05,
                    f"{r['worker_cpu_ms']:.3f} vs {fixed['worker_cpu_ms']:.3f} ms"
                    + (" (the fixed pool fell back)" if fixed["fallbacks"] else ""),
                )
            )
        if size != "var" and not math.isnan(r["x_memcpy"]):
            checks.append(
                (
                    f"worker CPU <= 1.3 x one memcpy, {size}",
                    r["x_memcpy"] <= 1.3,
                    f"{r['worker_cpu_ms']:.2f} ms = {r['x_memcpy']:.2f}x ({r['x_memcpy2']:.2f}x a memcpy "
                    f"with both cores copying; fixed pool {m[(size, 'fixed')]['x_memcpy'] if fixed else float('nan'):.2f}x)",
                )
            )
    startup = _by(results.get("startup", []), "case", "transport")
    for case, factor in (("numpy32", 3.0), ("torch4x8", 1.5)):
        e, s = startup.get((case, "elastic")), startup.get((case, "stock"))
        if e and s:
            ratio = _median(e, "mb_per_s") / _median(s, "mb_per_s")
            floor = startup.get((case, "floor"), [])
            ceiling = _median(floor, "mb_per_s") / _median(s, "mb_per_s")
            checks.append(
                (
                    f"start-up included, {case} >= {factor:g}x stock",
                    ratio >= factor,
                    f"{_median(e, 'mb_per_s'):.0f} vs {_median(s, 'mb_per_s'):.0f} MB/s = {ratio:.2f}x; "
                    f"moving nothing (floor): {_fmt(ceiling, '.2f')}x",
                )
            )
    for r in _ok(results.get("keep", [])):
        if r["transport"] == "elastic":
            checks.append(
                (
                    "keep every batch: 0 fallbacks, no wait >= 0.5 s",
                    r["fallbacks"] == 0 and r["max_wait_s"] < 0.5,
                    f"{r['fallbacks']} fallbacks, longest wait {r['max_wait_s']:.3f} s",
                )
            )
    for r in _ok(results.get("epochs", [])):
        if r["transport"] != "elastic":
            continue
        after = [e["committed_after"] / MiB for e in r["epochs"]]
        committed = max(e["committed_high_water"] for e in r["epochs"]) / MiB
        held = max(e["bytes_high_water"] for e in r["epochs"]) / MiB
        checks.append(
            (
                f"committed <= 1.25 x held + 16 MiB, {r['case']} epochs",
                committed <= 1.25 * held + 16,
                f"{committed:.0f} MiB vs limit {1.25 * held + 16:.0f} (held {held:.0f}) = "
                f"{committed / (1.25 * held + 16):.2f}x",
            )
        )
        if r["case"] == "shrink":
            checks.append(
                (
                    "shrink: committed <= 64 MiB within two 1 MiB epochs",
                    len(after) >= 3 and min(after[1:3]) <= 64,
                    "after each epoch " + ", ".join(f"{a:.0f}" for a in after) + " MiB",
                )
            )
        else:
            half = len(after) // 2
            checks.append(
                (
                    "variable sizes: committed does not grow over epochs",
                    max(after[half:]) <= max(after[:half]),
                    f"first half max {max(after[:half]):.0f}, second half max {max(after[half:]):.0f} MiB",
                )
            )
    pipe = _by(results.get("pipeline", []), "pipeline", "transport")
    for name in ("float32", "uint8"):
        e, s = pipe.get((name, "elastic")), pipe.get((name, "stock"))
        if not (e and s):
            continue
        sps = _median(e, "steps_per_s") / _median(s, "steps_per_s")
        over = _median(e, "overhead_ms") / _median(s, "overhead_ms")
        fb = max(r["fallbacks"] for r in e)
        checks.append((f"pipeline {name}: 0 fallbacks", fb == 0, f"{fb}"))
        checks.append((f"pipeline {name}: steps/s >= stock", sps >= 1.0, f"{sps:.2f}x"))
        checks.append(
            (
                f"pipeline {name}: main CPU/batch (minus the step) <= 0.2x stock",
                over <= 0.2,
                f"{_median(e, 'overhead_ms'):.2f} vs {_median(s, 'overhead_ms'):.2f} ms = {over:.2f}x "
                f"(with the step: {_median(e, 'main_cpu_ms'):.2f} vs {_median(s, 'main_cpu_ms'):.2f} ms)",
            )
        )
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    met = sum(ok for _, ok, _ in checks)
    lines = [f"targets: {met} of {len(checks)} met"]
    lines += [f"  {'met   ' if ok else 'MISSED'} {name}: {numbers}" for name, ok, numbers in checks]
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], path: str) -> None:
    """A CSV of flat rows (nested values as text)."""
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names and k not in ("rates", "epochs")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report(results: dict[str, Any], out_dir: str, name: str) -> tuple[str, bool]:
    """Write the text, the CSVs and the figure; ``(text, every run completed)``."""
    from ._sizing_plot import plot

    os.makedirs(out_dir, exist_ok=True)
    parts = [machine_line()]
    if results.get("matrix"):
        parts.append(matrix_table(results["matrix"]))
    if any(results.get(k) for k in ("startup", "keep", "epochs")):
        parts.append(epoch_tables(results))
    if results.get("pipeline"):
        parts.append(pipeline_table(results["pipeline"]))
    parts.append(format_checks(check_targets(results)))
    text = "\n".join(parts)
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    for part, rows in results.items():
        write_rows(rows, os.path.join(out_dir, f"{name}_{part}.csv"))
    plot(results, os.path.join(out_dir, f"{name}.png"), title=machine_line())
    complete = all(not r.get("skipped") for rows in results.values() for r in rows)
    return text, complete
