"""The sizing benchmark's figure: six panels, whatever parts were run."""

from __future__ import annotations

import statistics
from typing import Any

from ._config import MiB

COLORS = {"stock": "#9e9e9e", "fixed": "#f0a030", "elastic": "#2a7ab9"}


def _matrix_panels(axes: Any, rows: list[dict[str, Any]]) -> None:
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    by = {(r["size"], r["transport"]): r for r in rows}
    width = 0.8 / len(COLORS)
    panels = (
        (axes[0, 0], "mb_per_s", "steady-state MB/s", True),
        (axes[0, 1], "main_cpu_ms", "main-process CPU ms / batch", True),
        (axes[0, 2], "first_cpu_ms", "main-process CPU ms, new loader to 1st batch", False),
    )
    for ax, key, title, log in panels:
        for j, transport in enumerate(COLORS):
            xs, ys, fb = [], [], []
            for i, size in enumerate(sizes):
                r = by.get((size, transport))
                if r is None:
                    continue
                xs.append(i + (j - 1) * width)
                ys.append(r[key])
                fb.append(r["fallbacks"] > 0)
            bars = ax.bar(xs, ys, width, color=COLORS[transport], label=transport)
            for bar, fell in zip(bars, fb):
                if fell:
                    bar.set_hatch("xx")
                    bar.set_edgecolor("k")
        ax.set_xticks(range(len(sizes)), sizes, fontsize=8)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, title="hatched: fallbacks", title_fontsize=7)
    ax = axes[1, 0]
    for j, transport in enumerate(("fixed", "elastic")):
        xs = [i + (j - 0.5) * 0.4 for i, s in enumerate(sizes) if (s, transport) in by]
        rs = [by[(s, transport)] for s in sizes if (s, transport) in by]
        ax.bar(xs, [r["committed_peak_mib"] for r in rs], 0.4, color=COLORS[transport], label=f"{transport}: committed")
        ax.scatter(xs, [r["held_peak_mib"] for r in rs], color="k", marker="_", s=200, zorder=3)
        ax.scatter(xs, [r["committed_limit_mib"] for r in rs], color="r", marker="_", s=200, zorder=3)
    ax.plot([], [], "k_", label="in flight + held (peak)")
    ax.plot([], [], "r_", label="target: 1.25 x that + 16 MiB")
    ax.set_xticks(range(len(sizes)), sizes, fontsize=8)
    ax.set_yscale("log")
    ax.set_title("peak committed memory, MiB", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _epoch_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    styles = {("shrink", "elastic"): "-o", ("shrink", "fixed"): ":o", ("var", "elastic"): "-s", ("var", "fixed"): ":s"}
    for r in rows:
        ys = [e["committed_after"] / MiB for e in r["epochs"]]
        style = styles.get((r["case"], r["transport"]), "-")
        ax.plot(range(len(ys)), ys, style, color=COLORS[r["transport"]], label=f"{r['case']}, {r['transport']}", ms=4)
    ax.axhline(64, color="r", lw=0.8, ls="--", label="64 MiB")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (shrink: 128 MiB batches, then 1 MiB)", fontsize=8)
    ax.set_title("committed memory after each epoch, MiB", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _ratio_panel(ax: Any, results: dict[str, Any]) -> None:
    bars: list[tuple[str, float, float]] = []

    def med(rows: list[dict[str, Any]], key: str, **match: str) -> float:
        vals = [r[key] for r in rows if not r.get("skipped") and all(r[k] == v for k, v in match.items())]
        return statistics.median(vals) if vals else float("nan")

    start = results.get("startup", [])
    for case, target in (("numpy32", 3.0), ("torch4x8", 1.5)):
        for transport in ("fixed", "elastic"):
            ratio = med(start, "mb_per_s", case=case, transport=transport) / med(start, "mb_per_s", case=case, transport="stock")
            bars.append((f"{case}\n{transport}", ratio, target))
    pipe = results.get("pipeline", [])
    for name in ("float32", "uint8"):
        ratio = med(pipe, "steps_per_s", pipeline=name, transport="elastic") / med(
            pipe, "steps_per_s", pipeline=name, transport="stock"
        )
        bars.append((f"JPEG {name}\nsteps/s", ratio, 1.0))
    bars = [b for b in bars if b[1] == b[1]]
    if not bars:
        ax.set_visible(False)
        return
    xs = range(len(bars))
    colors = [COLORS["fixed"] if "fixed" in label else COLORS["elastic"] for label, _, _ in bars]
    ax.bar(xs, [b[1] for b in bars], color=colors)
    ax.scatter(xs, [b[2] for b in bars], color="r", marker="_", s=300, zorder=3, label="target")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    ax.set_title("x stock: short epochs with start-up; JPEG pipeline", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot(results: dict[str, Any], path: str, title: str = "") -> None:
    """Panels: MB/s, main CPU per batch, CPU to the first batch, committed memory,
    committed memory per epoch, ratios against stock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
    matrix = [r for r in results.get("matrix", []) if not r.get("skipped")]
    if matrix:
        _matrix_panels(axes, matrix)
    else:
        for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
            ax.set_visible(False)
    epochs = [r for r in results.get("epochs", []) if not r.get("skipped")]
    if epochs:
        _epoch_panel(axes[1, 1], epochs)
    else:
        axes[1, 1].set_visible(False)
    _ratio_panel(axes[1, 2], results)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
