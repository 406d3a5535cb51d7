"""The engineering acceptance targets of issues 3 and 10, judged on A/B results.

Why apart from the report, and only on request (``bench --targets``): these
are the bars the transports were built against, several of them limits no
design of the kind can reach (a copy-out ring's main-process CPU at half of
stock's where stock only maps the memory; 5x stock's throughput where stock
already runs within 5x of what the cores can copy). Printed by default they
made a working product read as a failing one; someone deciding whether to
use torch_arena wants the summary (:mod:`._summary`), someone working on the
transports wants these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._config import COLLATED_KIND, RING_FIXED, SPDL, Result
from ._report import _fmt, _lookup

__all__ = ["check_targets", "format_targets"]

#: The copy-out transports (issue 10's targets).
RINGS = ("ring", RING_FIXED)


def check_targets(results: Sequence[Result]) -> list[tuple[str, bool, str]]:
    """``(target, met, the numbers)`` for every target these results can judge."""
    by = _lookup(results)
    checks: list[tuple[str, bool, str]] = []
    top = max((r.size_mib for r in results), default=0)
    for kind, factor in (("numpy", 5.0), ("bytes", 5.0), ("torch", 2.0), (COLLATED_KIND, 2.0)):
        pool, stock = by.get((kind, top, "pool")), by.get((kind, top, "stock"))
        if pool and stock:
            ratio = pool.mb_per_s / stock.mb_per_s
            checks.append(
                (
                    f"pool >= {factor:g}x stock MB/s, {kind} {top:g} MiB",
                    ratio >= factor,
                    f"{pool.mb_per_s:.0f} vs {stock.mb_per_s:.0f} MB/s = {ratio:.2f}x",
                )
            )
    for (kind, size, transport), pool in sorted(by.items()):
        if transport != "pool":
            continue
        peer = by.get((kind, size, SPDL))
        if peer:
            ratio = pool.mb_per_s / peer.mb_per_s
            checks.append(
                (
                    f"pool >= 1.2x SPDL's pool, {kind} {size:g} MiB",
                    ratio >= 1.2,
                    f"{pool.mb_per_s:.0f} vs {peer.mb_per_s:.0f} MB/s = {ratio:.2f}x",
                )
            )
    for (kind, size, transport), pool in sorted(by.items()):
        if transport != "pool":
            continue
        checks.append(
            (
                f"pool main CPU <= 0.2 ms/batch, {kind} {size:g} MiB",
                pool.main_cpu_ms <= 0.2,
                f"{pool.main_cpu_ms:.3f} ms",
            )
        )
        if not math.isnan(pool.xfer_memcpy_ratio):
            checks.append(
                (
                    f"pool worker transfer CPU <= 1.3x memcpy, {kind} {size:g} MiB",
                    pool.xfer_memcpy_ratio <= 1.3,
                    (
                        f"{pool.worker_xfer_ms:.2f} ms = {pool.xfer_memcpy_ratio:.2f}x one memcpy "
                        f"({pool.memcpy_ms:.2f} ms)"
                    ),
                )
            )
        stock = by.get((kind, size, "stock"))
        if stock and not math.isnan(pool.peak_pss_mb) and not math.isnan(stock.peak_pss_mb):
            checks.append(
                (
                    f"pool peak memory <= stock's, {kind} {size:g} MiB",
                    pool.peak_pss_mb <= stock.peak_pss_mb,
                    f"{pool.peak_pss_mb:.0f} vs {stock.peak_pss_mb:.0f} MB",
                )
            )
    checks += _ring_targets(by)
    return checks


def _ring_targets(by: dict[tuple[str, float, str], Result]) -> list[tuple[str, bool, str]]:
    """Issue 10's targets for the copy-out rings: main-process CPU per batch
    <= 0.5x stock's and <= 1.3x one warm memcpy of the batch (reading the
    batch, ``touch``, left out of the latter: it is the loop's, not the transport's)."""
    checks: list[tuple[str, bool, str]] = []
    for (kind, size, transport), ring in sorted(by.items()):
        if transport not in RINGS:
            continue
        stock = by.get((kind, size, "stock"))
        if stock and stock.main_cpu_ms:
            ratio = ring.main_cpu_ms / stock.main_cpu_ms
            checks.append(
                (
                    f"{transport} main CPU <= 0.5x stock's, {kind} {size:g} MiB",
                    ratio <= 0.5,
                    f"{ring.main_cpu_ms:.2f} vs {stock.main_cpu_ms:.2f} ms = {ratio:.2f}x",
                )
            )
        if ring.memcpy_ms:
            own = ring.main_cpu_ms - ring.touch_ms
            ratio = own / ring.memcpy_ms
            shared = own / ring.memcpy_shared_ms if ring.memcpy_shared_ms else float("nan")
            checks.append(
                (
                    f"{transport} main CPU <= 1.3x memcpy, {kind} {size:g} MiB",
                    ratio <= 1.3,
                    f"{own:.2f} ms{' (reading the batch left out)' if ring.touch_ms else ''} = {ratio:.2f}x "
                    f"one memcpy ({ring.memcpy_ms:.2f} ms), {_fmt(shared, '.2f')}x one memcpy while both "
                    f"cores copy ({ring.memcpy_shared_ms:.2f} ms); private buffers "
                    f"{ring.private_fresh} fresh, {ring.private_reused} recycled",
                )
            )
    return checks


def format_targets(checks: Sequence[tuple[str, bool, str]]) -> str:
    if not checks:
        return "targets: none of the targets applies to these configurations"
    met = sum(ok for _, ok, _ in checks)
    lines = [f"targets: {met} of {len(checks)} met"]
    lines += [f"  {'met   ' if ok else 'MISSED'} {name}: {numbers}" for name, ok, numbers in checks]
    return "\n".join(lines)


