"""The A/B transport benchmark: torch's DataLoader transport against the arenas.

One *configuration* is a payload kind, a batch size in bytes and a transport:

* ``stock``: :class:`~torch_arena.ArenaDataLoader` with ``arena=None``, which is
  exactly torch's own transport (tensors through fresh shared-memory segments,
  everything else pickled through the worker pipe);
* ``ring`` / ``pool``: the same loader with ``arena="ring"`` / ``"pool"``, the
  arena sized for the loader's in-flight batches;
* ``spdl-pool``: SPDL's own segment pool, through
  ``spdl.pipeline.run_pipeline_in_subprocess(..., arena=SharedMemorySegmentPool)``
  on the same dataset (a peer, not a DataLoader);
* ``dataset-only``: the stock loader fetching every batch exactly as the
  others do, with a collate function that drops it and returns ``0``: the cost
  of *making* the payload, subtracted from the workers' CPU to get the cost of
  *moving* it.

Every configuration runs in a fresh interpreter (``_run.run_child``) started by
:func:`run_config`; the parent samples the memory of that process tree
meanwhile, so the sampler's own CPU is not charged to the configuration.
In the child:

* ``memcpy``: the median time of ``np.copyto`` of one batch's bytes into a
  pre-faulted buffer, alone and with every worker's core copying at once: the
  physical reference costs are reported against;
* one warm-up window, then ``windows`` timed windows of ``per_window`` batches
  (more if a window would be shorter than ``min_window_s``) in one long epoch
  (2 workers, ``prefetch_factor=2``); the main loop only drops each batch (or
  runs a simulated training step: ``touch``, ``step_reps``);
* throughput: batches per second of each window, mean and a 95 % confidence
  interval (Student's t over windows);
* main-process CPU: ``getrusage(RUSAGE_SELF)`` over the timed windows, all
  threads (queue feeder threads included);
* worker CPU: user + system time of every descendant process (the DataLoader
  workers, SPDL's producer) at the start and the end of the timed windows,
  while they are alive, from the kernel's per-process CPU clock (what psutil
  reads from ``/proc/<pid>/stat``, at nanosecond resolution; psutil where the
  clock cannot be read). Cross-check: after the workers are joined,
  ``RUSAGE_CHILDREN`` over their whole life divided by the live reading of
  their whole life (``worker_cpu_check``, ~1.0).

In the parent:

* peak memory (:func:`tree_memory_kib`): PSS without shared-memory files,
  plus each shared-memory file mapped or held open by the tree, once;
  sampled every ``pss_interval`` seconds while the loader runs;
* noise: CPU that other processes used meanwhile, in % of the machine; a
  noisy configuration can run again (:func:`run_matrix`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ._config import (
    ALL_TRANSPORTS,
    COLLATED_KIND,
    DATASET_ONLY,
    KINDS,
    SIZES_MIB,
    WORKERS,
    Config,
    Result,
)
from ._measure import calibrate_step
from ._report import format_table, machine_line, plot, read_csv, report, write_csv
from ._run import attach_dataset_cost, build_matrix, run_config, run_matrix
from ._summary import format_decisions, format_summary
from ._targets import check_targets, format_targets

__all__ = [
    "COLLATED_KIND",
    "DATASET_ONLY",
    "Config",
    "Result",
    "attach_dataset_cost",
    "calibrate_step",
    "check_targets",
    "cli",
    "format_decisions",
    "format_summary",
    "format_table",
    "format_targets",
    "main",
    "plot",
    "report",
    "run_config",
    "run_matrix",
    "write_csv",
]

QUICK: dict[str, Any] = {
    "kinds": ["bytes", "numpy", "torch", COLLATED_KIND],
    "sizes": [32.0],
    "window_mib": 256.0,
    "windows": 3,
}
#: The full matrix.
FULL: dict[str, Any] = {
    "kinds": list(KINDS),
    "sizes": [float(s) for s in SIZES_MIB],
    "window_mib": 512.0,
    "windows": 5,
}


def parser(prog: str, description: str, *, full: bool = True, targets: bool = True) -> argparse.ArgumentParser:
    """Command-line flags shared by the benchmark entry points. ``full``: whether
    the full table is printed unless ``--no-full``; ``targets``: whether
    ``--targets`` is offered."""
    modes = "\n".join(f"  {prog} {mode} [--help]: {what}" for mode, what in MODES.items())
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"other benchmarks:\n{modes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    p.add_argument("--quick", action="store_true", help="a short matrix (32 MiB, shorter windows)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None)
    p.add_argument("--sizes", nargs="+", type=float, default=None, help="batch sizes in MiB")
    p.add_argument("--transports", nargs="+", choices=ALL_TRANSPORTS, default=None)
    p.add_argument("--window-mib", type=float, default=None, help="payload per timed window")
    p.add_argument("--windows", type=int, default=None, help="timed windows per configuration")
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--slots", type=int, default=0, help="arena units (default: the loader's own)")
    p.add_argument(
        "--touch", action="store_true", help="the main loop reads one byte of every page of each batch"
    )
    p.add_argument("--item-sleep-ms", type=float, default=0.0, help="the dataset sleeps this long per item")
    p.add_argument("--pss-interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument(
        "--max-noise",
        type=float,
        default=10.0,
        help="run a configuration again when other processes used more than this %% of the machine",
    )
    p.add_argument("--retries", type=int, default=2, help="how often a noisy configuration runs again")
    p.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=full,
        help="print the full table (memcpy ratios, 95%% intervals, noise) after the summary; "
        f"it is always in <out>/<name>.txt (default: {'on' if full else 'off'})",
    )
    if targets:
        p.add_argument(
            "--targets",
            action="store_true",
            help="also judge the engineering acceptance targets of issues 3 and 10 (several are limits "
            "no copy-out design reaches: they are for whoever works on the transports)",
        )
    p.add_argument(
        "--resume",
        metavar="CSV",
        help="keep the quiet results of an earlier run's CSV; run only what is missing or noisy",
    )
    return p


def cli(
    argv: list[str] | None,
    *,
    prog: str,
    name: str,
    description: str,
    defaults: dict[str, Any] | None = None,
    table: Callable[[Sequence[Result]], str] = format_table,
    full: bool = True,
    targets: bool = True,
    **fields: Any,
) -> tuple[list[Result], argparse.Namespace]:
    """Parse flags, run the matrix with a progress line per configuration, print
    and write the report (``<out>/<name>.csv/.png/.txt``). ``defaults`` replace
    :data:`FULL`'s entries; ``fields`` are passed to every :class:`Config`.
    ``full``: print the full table unless ``--no-full``; ``targets``: offer
    ``--targets`` (the targets are judged only when it is given)."""
    args = parser(prog, description, full=full, targets=targets).parse_args(argv)
    # A terminated run takes the running configuration's processes along
    # (run_config kills its process group on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    base = {**FULL, **(QUICK if args.quick else {}), **(defaults or {})}
    if args.quick:  # shorter windows whatever the matrix
        base.update(window_mib=QUICK["window_mib"], windows=QUICK["windows"])
    configs, notes = build_matrix(
        args.kinds or base["kinds"],
        args.sizes or base["sizes"],
        args.transports or base.get("transports", list(ALL_TRANSPORTS)),
        window_mib=args.window_mib or base["window_mib"],
        windows=args.windows or base["windows"],
        workers=args.workers,
        slots=args.slots,
        item_sleep_ms=args.item_sleep_ms,
        **{"touch": args.touch, **fields},
    )
    print(f"{len(configs)} configurations, each in a fresh process; {machine_line(configs)}", flush=True)
    results = run_matrix(
        configs,
        pss_interval=args.pss_interval,
        progress=lambda s: print(s, flush=True),
        max_noise=args.max_noise,
        retries=args.retries,
        previous=read_csv(args.resume) if args.resume else (),
    )
    judged = [format_targets(check_targets(results))] if getattr(args, "targets", False) else []
    print("\n" + report(results, args.out, name, notes, table, full=args.full, extra=judged))  # after the progress
    path = os.path.join(args.out, name)
    print(
        f"wrote {path}.csv, the figure {path}.png and {path}.txt"
        + ("" if args.full else " (with the full table: memcpy ratios, 95% intervals, noise; --full prints it)")
    )
    return results, args


#: Sub-modes of ``python -m torch_arena bench``, besides the default A/B matrix.
MODES = {
    "sizing": "the sizing benchmark: stock vs fixed pool vs elastic pool, batch sizes 64 KiB-600 MiB, "
    "start-up, keeping batches, shrinking working sets, and the JPEG pipeline",
    "pipeline": "only the real input pipeline (JPEG decode, crop, flip; float32 and uint8) of the sizing benchmark",
}


def main(argv: list[str] | None = None, *, prog: str = "python -m torch_arena bench") -> int:
    """The full A/B transport benchmark: table on stdout, CSV and PNG in ``--out``;
    ``bench sizing [...]`` / ``bench pipeline [...]`` run the sizing benchmark
    (:mod:`torch_arena._tools.bench._sizing_run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODES:
        from ._sizing_run import main as sizing_main

        return sizing_main(argv[1:], prog=f"{prog} {argv[0]}", name=argv[0])
    results, _ = cli(
        argv,
        prog=prog,
        name="transport",
        description="A/B transport benchmark: torch's DataLoader transport vs the ring and the pool",
    )
    return 0 if all(not r.skipped for r in results) else 1
