"""A simulated training loop fed by stock vs pool vs ring DataLoaders.

The main process runs a fixed amount of CPU work per batch: it reads one byte
of every page of the batch (as any step that uses the batch does; for torch's
transport that is where the fresh mapping's page faults land), then a
single-threaded matmul loop calibrated to ``--step-ms`` of one core. Reported
per step: steps/s, the time the loop waits in ``next()``, main-process CPU
(all threads) and that CPU minus the step's own (the loader's overhead in the
training process), and the workers' CPU. 2 workers on a 2-core machine:
whatever the transport spends competes with the step. Method and harness:
:mod:`torch_arena._tools.bench`.

    python benchmarks/training_loop.py [--step-ms 10] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch_arena._tools.bench import COLLATED_KIND, Result, calibrate_step, cli


def format_training_table(results: Sequence[Result]) -> str:
    stock = {r.key: r.items_per_s for r in results if r.transport == "stock" and not r.skipped}
    head = (
        f"{'kind':<9}{'MiB':>4} {'transport':<10}{'steps/s':>8} {'x stock':>7} {'wait ms':>8} "
        f"{'main ms':>8} {'step ms':>8} {'read ms':>8} {'overhead':>9} {'wrk ms':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<10}{r.skipped}")
            continue
        ratio = r.items_per_s / stock[r.key] if stock.get(r.key) else float("nan")
        lines.append(
            f"{r.kind:<9}{r.size_mib:>4g} {r.transport:<10}{r.items_per_s:>8.1f} {ratio:>7.2f} "
            f"{r.wait_ms:>8.2f} {r.main_cpu_ms:>8.2f} {r.step_cpu_ms:>8.2f} {r.touch_ms:>8.2f} "
            f"{r.main_cpu_ms - r.step_cpu_ms:>9.2f} {r.worker_cpu_ms:>7.1f}"
        )
    lines.append(
        "per step: wait = time in next(); main = main-process CPU (all threads); step = the "
        "matmuls' CPU (main thread); read = reading one byte per page of the batch (page "
        "faults on freshly mapped memory land here); overhead = main - step, i.e. what the "
        "loader and its memory cost the training process; wrk = CPU of the worker processes"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--step-ms", type=float, default=10.0, help="CPU work per step (one core)")
    ours, rest = own.parse_known_args(sys.argv[1:])
    reps = calibrate_step(ours.step_ms)
    print(f"step: {reps} single-threaded 128x128 matmuls ~ {ours.step_ms:g} ms of one core", flush=True)
    results, _ = cli(
        rest,
        prog="benchmarks/training_loop.py",
        name="training_loop",
        description="stock vs pool vs ring feeding a simulated training step (--step-ms, default 10)",
        defaults={"kinds": ["numpy", COLLATED_KIND], "sizes": [32.0], "transports": ["stock", "pool", "ring"]},
        table=format_training_table,
        targets=False,
        step_reps=reps,
        step_ms=ours.step_ms,
        touch=True,
    )
    sys.exit(0 if all(not r.skipped for r in results) else 1)
