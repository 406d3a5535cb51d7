"""``python -m torch_arena bench sizing`` / ``bench pipeline``: the plan, the
runs (each measurement in a fresh, memory-sampled process:
:func:`~torch_arena._tools.bench._run.run_child`), and the summaries.

Parts:

* ``matrix``: batch sizes × {stock, fixed, elastic} (:func:`~._sizing.measure_size`);
* ``startup``: 48 × 32 MiB numpy items and 192 × 4 MiB tensors collated by 8,
  one epoch from ``iter()`` to its end, transports alternated ``--reps`` times;
* ``keep``: ``list(loader)`` over 24 × 32 MiB batches;
* ``epochs``: one loader, an epoch of 128 MiB batches then epochs of 1 MiB
  (``shrink``), and many epochs of padded sequences (``var``);
* ``pipeline``: the JPEG pipeline (:mod:`._pipeline`), stock vs elastic
  alternated ``--reps`` times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._config import MiB
from ._measure import t95
from ._run import run_child
from ._sizing import FLOOR, RING, SIZES, TRANSPORTS, VAR, per_window_for

PARTS = ("matrix", "startup", "keep", "epochs", "pipeline")
_SIZING = "torch_arena._tools.bench._sizing"


def size_label(size: float | str) -> str:
    """``64 KiB``, ``32 MiB``, ``var``."""
    if size == VAR:
        return VAR
    mib = float(size)
    return f"{mib * 1024:g} KiB" if mib < 1 else f"{mib:g} MiB"


def _rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` starting at position ``k``: alternates which transport runs first."""
    k %= len(items)
    return [*items[k:], *items[:k]]


#: A run during which other processes used more than this % of the machine runs
#: again, up to RETRIES times; the quietest is kept (``--max-noise``, ``--retries``).
NOISE = {"max": 20.0, "retries": 1}


def _run(entry: str, payload: dict[str, Any], progress: Callable[[str], None], label: str) -> dict[str, Any]:
    runs = [run_child(entry, payload, pss_interval=0.1)]
    while not runs[-1]["skipped"] and runs[-1]["noise_pct"] > NOISE["max"] and len(runs) <= NOISE["retries"]:
        progress(f"{label}: noisy ({runs[-1]['noise_pct']:.0f}% of the machine busy elsewhere), again")
        runs.append(run_child(entry, payload, pss_interval=0.1))
    child = min(runs, key=lambda c: (bool(c["skipped"]), c["noise_pct"]))
    raw = child["raw"] or {}
    row = {**payload, **raw, "peak_pss_mb": child["peak_pss_mb"], "noise_pct": child["noise_pct"]}
    row["skipped"] = child["skipped"]
    row.pop("paths", None)
    note = child["skipped"] or f"{child['wall_s']:.1f} s, noise {child['noise_pct']:.0f}%"
    progress(f"{label}: {note}")
    return row


def matrix_row(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-batch figures of one :func:`~._sizing.measure_size` run."""
    if raw.get("skipped"):
        return {"size": size_label(raw["size"]), "transport": raw["transport"], "skipped": raw["skipped"]}
    rates, mb = raw["rates"], raw["batch_bytes"] / 1e6
    n = len(rates)
    mean = statistics.mean(rates)
    half = t95(n) * statistics.stdev(rates) / math.sqrt(n) if n > 1 else 0.0
    hw = raw["bytes_high_water"]
    limit = 1.25 * hw + 16 * MiB
    arena = raw["transport"] != "stock"
    return {
        "size": size_label(raw["size"]),
        "transport": raw["transport"],
        "batch_mib": raw["batch_bytes"] / MiB,
        "batches": raw["batches"],
        "fallbacks": raw["fallbacks"],
        "mb_per_s": mean * mb,
        "mb_per_s_ci": half * mb,
        "main_cpu_ms": raw["main_cpu_ms"],
        "worker_cpu_ms": raw["worker_cpu_ms"],
        "memcpy_ms": raw["memcpy_ms"],
        "x_memcpy": raw["worker_cpu_ms"] / raw["memcpy_ms"] if raw["memcpy_ms"] else float("nan"),
        "x_memcpy2": raw["worker_cpu_ms"] / raw["memcpy_shared_ms"] if raw["memcpy_shared_ms"] else float("nan"),
        "first_cpu_ms": raw["first_cpu_ms"],
        "first_wall_ms": raw["first_wall_ms"],
        "held_peak_mib": hw / MiB if arena else float("nan"),
        "committed_peak_mib": raw["committed_high_water"] / MiB if arena else float("nan"),
        "committed_limit_mib": limit / MiB if arena else float("nan"),
        "committed_x_limit": raw["committed_high_water"] / limit if arena else float("nan"),
        "peak_pss_mb": raw["peak_pss_mb"],
        "noise_pct": raw["noise_pct"],
        "skipped": "",
        **{k: raw[k] for k in ("private_kept", "private_fresh", "private_reused") if k in raw},
    }


def run_matrix(
    sizes: Sequence[float | str],
    windows: int,
    progress: Callable[[str], None],
    transports: Sequence[str] = TRANSPORTS,
) -> list[dict[str, Any]]:
    """The sizing matrix; the transport that runs first rotates with the size."""
    rows = []
    for k, size in enumerate(sizes):
        for transport in _rotated(transports, k):
            payload = {"size": size, "transport": transport, "windows": windows, "per_window": per_window_for(size)}
            rows.append(matrix_row(_run(f"{_SIZING}:measure_size", payload, progress, f"{size_label(size)} {transport}")))
    return rows


def run_epochs(
    parts: Sequence[str], reps: int, quick: bool, progress: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """The start-up, keep-every-batch and shrink/variable-size scenarios (those in ``parts``)."""
    out: dict[str, list[dict[str, Any]]] = {"startup": [], "keep": [], "epochs": []}
    for rep in range(reps if "startup" in parts else 0):
        for case in ("numpy32", "torch4x8"):
            for transport in _rotated((*TRANSPORTS, FLOOR), rep):
                payload = {"case": case, "transport": transport, "rep": rep}
                out["startup"].append(_run(f"{_SIZING}:measure_epoch", payload, progress, f"startup {case} {transport}"))
    for transport in TRANSPORTS if "keep" in parts else ():
        payload = {"case": "keep32", "transport": transport, "keep": True}
        out["keep"].append(_run(f"{_SIZING}:measure_epoch", payload, progress, f"keep {transport}"))
    shrink = {"case": "shrink", "big_batches": 8 if quick else 16, "small_batches": 64, "small_epochs": 3}
    var = {"case": "var", "epochs": 4 if quick else 10, "batches": 12}
    for plan in (shrink, var) if "epochs" in parts else ():
        for transport in ("fixed", "elastic"):
            out["epochs"].append(
                _run(f"{_SIZING}:measure_epochs", {**plan, "transport": transport}, progress, f"{plan['case']} {transport}")
            )
    return out


def run_pipeline(
    out_dir: str, reps: int, batches: int, progress: Callable[[str], None], decoder: str | None = None
) -> list[dict[str, Any]]:
    """The JPEG pipeline, stock and elastic alternated ``reps`` times, decoded
    by ``decoder`` (default: torchvision where it imports, else PIL)."""
    from ._pipeline import PIPELINES, decoder_label, default_decoder, make_jpegs

    paths = make_jpegs(os.path.join(out_dir, "jpegs"))
    decoder = decoder or default_decoder()
    progress(f"JPEG pipeline: decode and transforms by {decoder_label(decoder)}")
    rows = []
    for rep in range(reps):
        for pipeline in PIPELINES:
            for transport in _rotated(("stock", "elastic"), rep):
                payload = {
                    "pipeline": pipeline,
                    "transport": transport,
                    "decoder": decoder,
                    "paths": paths,
                    "batches": batches,
                    "warmup": 2,
                }
                rows.append(
                    _run("torch_arena._tools.bench._pipeline:measure_pipeline", payload, progress, f"{pipeline} {transport}")
                )
    return rows


def parser(prog: str) -> argparse.ArgumentParser:
    """Flags of ``bench sizing`` / ``bench pipeline``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Sizing benchmark (issue 9): stock vs the fixed pool of 0.1.0 (6 x 64 MiB) vs the "
            "elastic pool (arena='pool'): fallbacks, committed memory against bytes in flight + "
            "held, CPU and wall time to the first batch, steady-state MB/s and CPU per batch, "
            "short epochs with start-up, keeping every batch, shrinking working sets, and a "
            "real JPEG pipeline (torchvision's or PIL's decode, random resized crop, flip; float32 and uint8)."
        ),
    )
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    p.add_argument("--quick", action="store_true", help="fewer sizes, windows and repetitions (~3 minutes on 2 busy cores)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None, help=f"what to run (default: all of {PARTS})")
    p.add_argument(
        "--sizes", nargs="+", default=None, help="matrix batch sizes in MiB, or 'var' (default: 0.0625 1 32 160 600 var)"
    )
    p.add_argument(
        "--transports",
        nargs="+",
        choices=(*TRANSPORTS, RING),
        default=None,
        help=f"matrix transports (default: {' '.join(TRANSPORTS)}; {RING}: arena='ring', the elastic ring)",
    )
    p.add_argument("--windows", type=int, default=None, help="timed windows per matrix configuration (default 4)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the start-up and pipeline A/Bs (default 3)")
    p.add_argument(
        "--max-noise",
        type=float,
        default=NOISE["max"],
        help="run a measurement again when other processes used more than this %% of the machine (default 20)",
    )
    p.add_argument("--retries", type=int, default=NOISE["retries"], help="how often a noisy run runs again (default 1)")
    p.add_argument("--pipeline-batches", type=int, default=None, help="timed steps per pipeline run (default 16)")
    p.add_argument(
        "--decoder",
        choices=("torchvision", "PIL"),
        default=None,
        help="JPEG decode and transforms of the pipeline (default: torchvision where it imports, else PIL)",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m torch_arena bench sizing", name: str = "sizing") -> int:
    """Run the chosen parts, print the report, write ``<out>/<name>.{json,txt,png}`` and CSVs."""
    from ._sizing_report import report

    cli = parser(prog)
    args = cli.parse_args(argv)
    if args.decoder == "torchvision":
        from ._pipeline import torchvision_error

        if torchvision_error():
            cli.error(f"--decoder torchvision: torchvision does not import here ({torchvision_error()})")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    parts = args.parts or (["pipeline"] if name == "pipeline" else list(PARTS))
    sizes: list[float | str] = (
        [s if s == VAR else float(s) for s in args.sizes]
        if args.sizes
        else ([1 / 16, 1.0, 32.0, VAR] if args.quick else list(SIZES))
    )
    NOISE.update(max=args.max_noise, retries=args.retries)
    reps = args.reps or (1 if args.quick else 3)
    windows = args.windows or (2 if args.quick else 4)

    def progress(line: str) -> None:
        print(line, flush=True)

    results: dict[str, Any] = {}
    if "matrix" in parts:
        results["matrix"] = run_matrix(sizes, windows, progress, args.transports or TRANSPORTS)
    if {"startup", "keep", "epochs"} & set(parts):
        epochs = run_epochs(parts, reps, args.quick, progress)
        results.update({k: v for k, v in epochs.items() if k in parts})
    if "pipeline" in parts:
        batches = args.pipeline_batches or (6 if args.quick else 16)
        results["pipeline"] = run_pipeline(args.out, reps if not args.quick else 1, batches, progress, args.decoder)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    text, ok = report(results, args.out, name)
    print(text)
    print(f"wrote {os.path.join(args.out, name)}.json, .txt, .png and the CSVs")
    return 0 if ok else 1
