"""What the A/B results mean for someone choosing a transport: the summary and
the per-payload table that ``demo`` and ``bench`` lead with.

Why a view of its own: the full table (:func:`._report.format_table`) is for
whoever works on the transports (memcpy ratios, confidence intervals, noise).
Someone deciding whether to put a DataLoader on an arena asks four things per
payload, each against torch's own transport ("stock"): how much faster, how
much CPU the training process gets back, what the workers pay, and how much
memory it costs. Every figure and every word of judgement here is computed
from the rows; where an arena loses on one of the four, or to SPDL's pool, the
summary says so in as many words instead of leaving it to a column.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from ._config import ALL_TRANSPORTS, COLLATED_KIND, DATASET_ONLY, KINDS, RING_FIXED, SPDL, Result

__all__ = ["format_decisions", "format_summary", "sentence"]

#: torch_arena's own transports: the two ``arena=`` strings, then the user-made fixed ring.
#: The summary's sentences speak of the first one that ran (the pool, which
#: ``arena="pool"`` and the README lead with); the table shows them all.
OURS = ("pool", "ring", RING_FIXED)
#: Payloads in sentences, and in the lists of where an arena loses.
PAYLOADS = {
    "bytes": "bytes batches",
    "numpy": "numpy batches",
    "torch": "tensor batches",
    COLLATED_KIND: "collated batches of 8 tensor samples",
    "packets": "SPDL packet batches",
}
SHORT = {
    "bytes": "bytes",
    "numpy": "numpy",
    "torch": "tensors",
    COLLATED_KIND: "collated samples",
    "packets": "packets",
}
#: Above this much foreign CPU (% of the machine) the summary warns that its ratios are rough.
NOISY_PCT = 10.0
WIDTH = 104
_Key = tuple[str, float, str]


def _measured(value: float) -> bool:
    return value is not None and not math.isnan(value)


def _ratio(value: float, base: float) -> float:
    return value / base if _measured(value) and _measured(base) and base else float("nan")


def times(ratio: float) -> str:
    """``23×``, ``4.0×``, ``0.61×``: two figures where a ratio sits near 1, where they matter."""
    if not _measured(ratio):
        return "?×"
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×" if ratio >= 2 else f"{ratio:.2f}×"


def change(value: float, base: float) -> str:
    """``-92%``, ``+17%``; ``-99.5%`` rather than a ``-100%`` that reads as "none
    at all"; ``3.2× stock's`` once a figure more than doubles (``+220%`` reads worse)."""
    ratio = _ratio(value, base)
    if not _measured(ratio):
        return "unmeasured"
    if ratio >= 2:
        return f"{times(ratio)} stock's"
    pct = 100 * (ratio - 1)
    if round(pct) == 0:
        return "0%"  # not "-0%"
    return f"{max(pct, -99.9):+.1f}%" if pct < -99.5 and ratio > 0 else f"{pct:+.0f}%"


def _overlap(a: Result, b: Result) -> bool:
    """Whether the 95 % intervals of two throughputs overlap (rows without one never do)."""
    if not (a.mb_per_s_hi > a.mb_per_s_lo and b.mb_per_s_hi > b.mb_per_s_lo):
        return False
    return a.mb_per_s_lo <= b.mb_per_s_hi and b.mb_per_s_lo <= a.mb_per_s_hi


def _ms(value: float) -> str:
    return "?" if not _measured(value) else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _payload(r: Result, sized: bool) -> str:
    name = PAYLOADS.get(r.kind, f"{r.kind} batches")
    return f"{r.size_mib:g} MiB {name}" if sized else name


def sentence(r: Result, stock: Result, *, sized: bool = False) -> str:
    """One arena row against stock in plain words: throughput, main-process and
    worker CPU per batch, peak memory; "slower" where it is, and "noisy" where
    the two throughputs' 95 % intervals overlap."""
    speed = _ratio(r.mb_per_s, stock.mb_per_s)
    payload = _payload(r, sized)
    if _measured(speed) and speed < 1 and times(speed) != "1.00×":
        said = f"slower than stock for {payload}, {times(speed)} its throughput"
    else:
        said = f"{times(speed)} stock's throughput for {payload}"
    if _overlap(r, stock):
        said += " (noisy: the 95% intervals overlap)"
    parts = [
        said,
        f"main-process CPU per batch {_ms(r.main_cpu_ms)} ms instead of {_ms(stock.main_cpu_ms)} ms "
        f"({change(r.main_cpu_ms, stock.main_cpu_ms)})",
        f"worker CPU {_ms(r.worker_cpu_ms)} ms instead of {_ms(stock.worker_cpu_ms)} ms "
        f"({change(r.worker_cpu_ms, stock.worker_cpu_ms)})",
    ]
    if _measured(r.peak_pss_mb) and _measured(stock.peak_pss_mb):
        parts.append(
            f"peak memory {r.peak_pss_mb:.0f} MB instead of {stock.peak_pss_mb:.0f} MB "
            f"({change(r.peak_pss_mb, stock.peak_pss_mb)})"
        )
    text = f"{r.transport}: " + "; ".join(parts) + "."
    if r.fallbacks:
        text += f" {r.fallbacks} batches fell back to torch's transport (the arena was full)."
    return text


def _rows(results: Sequence[Result]) -> tuple[dict[_Key, Result], list[tuple[str, float]]]:
    """Measured rows by (kind, size, transport), and the (kind, size) pairs with a stock row, in table order."""
    by = {(*r.key, r.transport): r for r in results if not r.skipped}
    kinds = {k: i for i, k in enumerate(KINDS)}
    keys = sorted({r.key for r in results if (*r.key, "stock") in by}, key=lambda k: (kinds.get(k[0], 99), k[1]))
    return by, keys


def _worse(r: Result, stock: Result, peer: Result | None) -> dict[str, tuple[float, str]]:
    """The figures on which ``r`` does worse than stock (or, for the pool, than
    SPDL's pool ``peer``): ``{what: (how much, in words)}``."""
    out = {}
    for what, other in (("Slower than stock", stock), ("Slower than SPDL's pool", peer)):
        if other is None or not (other is stock or r.transport == "pool"):
            continue
        ratio = _ratio(r.mb_per_s, other.mb_per_s)
        if ratio < 1 and times(ratio) != "1.00×":  # a loss that rounds to nothing is not one
            out[what] = (ratio, times(ratio) + (", noisy" if _overlap(r, other) else ""))
    for what, mine, theirs in (
        ("More main-process CPU per batch than stock", r.main_cpu_ms, stock.main_cpu_ms),
        ("More worker CPU per batch than stock", r.worker_cpu_ms, stock.worker_cpu_ms),
        ("More peak memory than stock", r.peak_pss_mb, stock.peak_pss_mb),
    ):
        if _measured(mine) and _measured(theirs) and mine > theirs and change(mine, theirs) != "0%":
            out[what] = (mine / theirs, change(mine, theirs))
    if r.fallbacks:
        out["Fell back to torch's transport (the arena was full)"] = (r.fallbacks, f"{r.fallbacks} batches")
    return out


#: The figures an arena can lose on, in the order the summary lists them.
_FIGURES = [
    "Slower than stock",
    "Slower than SPDL's pool",
    "More main-process CPU per batch than stock",
    "More worker CPU per batch than stock",
    "More peak memory than stock",
    "Fell back to torch's transport (the arena was full)",
]
#: Why, where the design says so (not the measurement): said after a figure's list.
_WHY = {
    "More main-process CPU per batch than stock": (
        ("ring", RING_FIXED),
        "a ring copies every batch out of shared memory in the main process, where stock maps arrays and "
        "tensors in place",
    ),
    "More peak memory than stock": (
        OURS,
        "an arena keeps its shared memory for the next batches, where stock frees each batch's",
    ),
}


def _losses(by: dict[_Key, Result], keys: Sequence[tuple[str, float]], sized: bool) -> list[str]:
    """Every figure on which one of torch_arena's transports does worse than
    stock (or the pool than SPDL's pool): one line per figure, naming the
    transports and the payloads, with how much."""
    found: dict[str, dict[str, list[tuple[str, float, str]]]] = {}
    ran: dict[str, int] = {}
    for transport in OURS:
        for key in keys:
            r = by.get((*key, transport))
            if r is None:
                continue
            ran[transport] = ran.get(transport, 0) + 1
            where = f"{key[1]:g} MiB {SHORT.get(key[0], key[0])}" if sized else SHORT.get(key[0], key[0])
            for what, (value, said) in _worse(r, by[(*key, "stock")], by.get((*key, SPDL))).items():
                found.setdefault(what, {}).setdefault(transport, []).append((where, value, said))
    lines = []
    for what, per_transport in sorted(found.items(), key=lambda item: _FIGURES.index(item[0])):
        parts = []
        for transport, places in per_transport.items():
            if len(places) == ran[transport] > 1:
                lo, hi = min(places, key=lambda p: p[1]), max(places, key=lambda p: p[1])
                spread = lo[2] if lo[2] == hi[2] else f"{lo[2]} to {hi[2]}"
                parts.append(f"{transport} for every payload ({spread})")
            else:
                parts.append(f"{transport} for " + _join([f"{where} ({said})" for where, _, said in places]))
        line = f"{what}: " + "; ".join(parts)
        losers, why = _WHY.get(what, ((), ""))
        if any(t in per_transport for t in losers):
            line += f": {why}"
        lines.append(line + ".")
    return lines


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _setting(results: Sequence[Result]) -> str:
    """What ran, in words: batch sizes, workers, what the loop did with each batch."""
    ran = [r for r in results if not r.skipped]
    sizes = sorted({r.size_mib for r in ran})
    workers = sorted({r.workers for r in ran if r.workers})
    parts = [f"{'/'.join(f'{s:g}' for s in sizes)} MiB batches"]
    if workers:
        parts.append(f"{'/'.join(map(str, workers))} worker{'s' if workers[-1] != 1 else ''}")
    steps = sorted({r.step_ms for r in ran if r.step_ms})
    if steps:
        parts.append(f"a simulated {'/'.join(f'{s:g}' for s in steps)} ms training step per batch")
    elif any(r.touch_ms for r in ran):
        parts.append("the loop reads every page of each batch")
    else:
        parts.append("the loop only takes each batch")
    return ", ".join(parts)


def format_summary(results: Sequence[Result]) -> str:
    """The plain-language summary: a sentence per payload for the pool (or the
    first of torch_arena's transports that ran), at the largest batch size
    measured; then every figure on which an arena does not win; then a warning
    when other processes made the figures rough."""
    by, keys = _rows(results)
    spoken = next((t for t in OURS if any((*key, t) in by for key in keys)), None)
    if spoken is None:
        return f"In short ({_setting(results)}): no arena ran alongside stock, so there is nothing to compare."
    sized = len({size for _, size in keys}) > 1
    largest = {kind: max(size for k, size in keys if k == kind) for kind, _ in keys}
    # no break inside "ring-fixed" or "spdl-pool"
    wrap = dict(width=WIDTH, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
    lines = [f'In short ({_setting(results)}; each against torch\'s own transport, "stock"):']
    for kind, size in keys:
        r = by.get((kind, size, spoken))
        if r is not None and size == largest[kind]:
            lines.append(textwrap.fill(sentence(r, by[(kind, size, "stock")], sized=sized), **wrap))
    losses = _losses(by, keys, sized)
    lines.append("Where the arenas do not win:" if losses else "Where the arenas do not win: nowhere in this run.")
    lines += [textwrap.fill(line, **wrap) for line in losses]
    noise = [r.noise_pct for r in results if not r.skipped and _measured(r.noise_pct)]
    if noise and max(noise) > NOISY_PCT:
        lines.append(
            textwrap.fill(
                f"Note: other processes used up to {max(noise):.0f}% of the machine during these runs, so "
                "the ratios are rough (the full table's 95% intervals say how rough).",
                width=WIDTH,
            )
        )
    return "\n".join(lines)


def format_decisions(results: Sequence[Result]) -> str:
    """The per-payload table behind the summary: every transport against stock
    on the four figures, with the change from stock's next to each."""
    by, keys = _rows(results)
    if not keys:
        return "(no stock row to compare against: the full table has the figures)"
    head = (
        f"{'payload':<9}{'MiB':>4}  {'transport':<11}{'MB/s':>7} {'× stock':>8}  "
        f"{'main ms':>8} {'vs stock':>9}  {'worker ms':>9} {'vs stock':>9}  {'peak MB':>8} {'vs stock':>9}"
    )
    lines = [head, "-" * len(head)]
    order = {t: i for i, t in enumerate(ALL_TRANSPORTS)}
    for key in keys:
        stock = by[(*key, "stock")]
        rows = [r for k, r in by.items() if k[:2] == key and k[2] != DATASET_ONLY]
        for r in sorted(rows, key=lambda r: order.get(r.transport, 99)):
            vs = r is not stock
            lines.append(
                f"{r.kind:<9}{r.size_mib:>4g}  {r.transport:<11}{r.mb_per_s:>7.0f} "
                f"{times(_ratio(r.mb_per_s, stock.mb_per_s)):>8}  "
                f"{_ms(r.main_cpu_ms):>8} {change(r.main_cpu_ms, stock.main_cpu_ms) if vs else '-':>9}  "
                f"{_ms(r.worker_cpu_ms):>9} {change(r.worker_cpu_ms, stock.worker_cpu_ms) if vs else '-':>9}  "
                f"{r.peak_pss_mb:>8.0f} {change(r.peak_pss_mb, stock.peak_pss_mb) if vs else '-':>9}"
            )
    lines += [f"{r.kind:<9}{r.size_mib:>4g}  {r.transport:<11}{r.skipped}" for r in results if r.skipped]
    legend = (
        "stock: torch's own transport; ring / pool: arena=\"ring\" / \"pool\"; ring-fixed: a "
        "SharedMemoryRingBuffer of the same budget; spdl-pool: SPDL's own segment pool, for comparison. "
        "× stock: throughput against stock's; main / worker ms: CPU per batch of the training process / "
        "of all worker processes; peak MB: peak memory of the process tree (each shared page once)"
    )
    return "\n".join([*lines, textwrap.fill(legend, width=WIDTH, break_on_hyphens=False)])
