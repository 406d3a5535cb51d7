"""Would the ring's copy-out pay in a background thread? (issue 10's overlap study)

The ring's restore (the copy of each batch into recycled private memory) runs
in the thread that reads torch's worker queue: the main thread, unless
``pin_memory`` runs with an accelerator. This benchmark measures, outside the
library, a prototype that moves it off the training loop: a *feeder* thread
runs ``next()`` on the loader's iterator and hands each batch to the loop
through a ``queue.Queue(maxsize=2)``; the copy (``np.copyto``, which releases
the GIL for large arrays) could then overlap with the training step.

Transports (``--transports``): ``stock`` (torch's own), ``ring``
(``arena="ring"``, copy-out inline), ``ring-thread`` (the same loader behind
the feeder thread), ``pool`` (``arena="pool"``, zero-copy), and as a control
``stock-thread`` (torch's transport behind the same thread). Default settings
otherwise: 2 workers, ``prefetch_factor=2``, no ``arena_budget``.

The training step reads one byte of every page of the batch, then runs
single-threaded ``n × n`` matmuls (:func:`~torch_arena._tools.bench._measure.matmul_step`) calibrated to ``--step-ms`` of one core:
``--step-n 128`` (many short ops, the Python loop holds the GIL between them)
or ``--step-n 512`` (few long ops that release it). Per configuration, in a
fresh process (:func:`torch_arena._tools.bench._run.run_child`): steps/s per window
(mean, 95 % CI), time the loop waits for a batch, main-process CPU per step
(all threads, the feeder's included), the step's own CPU (main thread), the
CPU of ``next()`` (the restore: in the main thread or the feeder), and the
workers' CPU. Transports are alternated ``--reps`` times; the report gives
each ratio to stock from the same repetition, then the median.

    python benchmarks/overlap.py [--kinds numpy torch-x8] [--step-ms 30] [--step-n 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time
from typing import Any

from torch_arena._tools.bench._config import COLLATED_KIND, MiB, PREFETCH, WORKERS
from torch_arena._tools.bench._measure import (
    _cpu_of,
    _cpu_self,
    calibrate_step,
    matmul_step,
    memcpy_seconds,
    t95,
    touch_pages,
)
from torch_arena._tools.bench._payloads import PayloadDataset, base_kind, samples_per_batch
from torch_arena._tools.bench._run import run_child

TRANSPORTS = ("stock", "ring", "ring-thread", "pool")
CONTROL = "stock-thread"
#: Batches the feeder may hold ready for the loop (``queue.Queue(maxsize=...)``).
QUEUE_DEPTH = 2
_ENDLESS = 1 << 40


class Feeder:
    """The prototype: a thread that runs ``next()`` on ``it`` and queues the batches."""

    def __init__(self, it: Any) -> None:
        self.it, self.q = it, queue.Queue(maxsize=QUEUE_DEPTH)
        self.stop, self.next_cpu, self.error = threading.Event(), 0.0, None
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                t0 = time.thread_time()
                batch = next(self.it)
                self.next_cpu += time.thread_time() - t0
                while not self.stop.is_set():
                    try:
                        self.q.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                del batch
        except BaseException as exc:  # noqa: BLE001 - reported by get()
            self.error = exc
            self.q.put(None)

    def get(self) -> Any:
        batch = self.q.get()
        if batch is None and self.error is not None:
            raise RuntimeError("feeder thread failed") from self.error
        return batch

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()


def measure(p: dict[str, Any]) -> dict[str, Any]:
    """One (kind, transport) run; ``p``: ``kind``, ``transport``, ``step_n``,
    ``step_reps``, ``warmup``, ``per_window``, ``windows``."""
    import psutil  # noqa: F401 - imported before any timing
    import torch

    from torch_arena import ArenaDataLoader

    torch.set_num_threads(1)
    kind, transport = p["kind"], p["transport"]
    samples = samples_per_batch(kind)
    nbytes = 32 * MiB
    memcpy, memcpy_shared = memcpy_seconds(nbytes), memcpy_seconds(nbytes, concurrent=WORKERS)
    arena = {"ring": "ring", "pool": "pool"}.get(transport.removesuffix("-thread"))
    loader = ArenaDataLoader(
        PayloadDataset(base_kind(kind), nbytes // samples, _ENDLESS),
        batch_size=None if samples == 1 else samples,
        num_workers=WORKERS,
        prefetch_factor=PREFETCH,
        arena=arena,
    )
    began = time.time()
    it = iter(loader)
    feeder = Feeder(it) if transport.endswith("-thread") else None
    inline_next = [0.0]

    def get() -> Any:
        if feeder is not None:
            return feeder.get()
        t0 = time.thread_time()
        batch = next(it)
        inline_next[0] += time.thread_time() - t0
        return batch

    def one_step() -> float:
        tw = time.perf_counter()
        batch = get()
        waited = time.perf_counter() - tw
        touch_pages(batch)
        matmul_step(p["step_reps"], p["step_n"])
        del batch
        return waited

    try:
        for _ in range(p["warmup"]):
            one_step()
        pids = [w.pid for w in it._workers]
        workers0, cpu0, step0 = _cpu_of(pids), _cpu_self(), time.thread_time()
        next0 = feeder.next_cpu if feeder else inline_next[0]
        rates, wait = [], 0.0
        for _ in range(p["windows"]):
            t0 = time.perf_counter()
            for _ in range(p["per_window"]):
                wait += one_step()
            rates.append(p["per_window"] / (time.perf_counter() - t0))
        cpu1, main1 = _cpu_self(), time.thread_time()
        next1 = feeder.next_cpu if feeder else inline_next[0]
        workers1 = _cpu_of(pids)
        steps = p["windows"] * p["per_window"]
        if feeder is not None:
            feeder.close()
        stats = loader.arena_stats
    finally:
        if feeder is not None:
            feeder.close()
        it._shutdown_workers()
        loader.release_arena()
    main_thread = (main1 - step0) - (next1 - next0 if feeder is None else 0.0)
    return {
        "kind": kind,
        "transport": transport,
        "rates": rates,
        "steps": steps,
        "wait_ms": wait / steps * 1e3,
        "main_cpu_ms": (cpu1 - cpu0) / steps * 1e3,
        "loop_cpu_ms": main_thread / steps * 1e3,
        "next_cpu_ms": (next1 - next0) / steps * 1e3,
        "worker_cpu_ms": (workers1 - workers0) / steps * 1e3,
        "memcpy_ms": memcpy * 1e3,
        "memcpy_shared_ms": memcpy_shared * 1e3,
        "fallbacks": stats.fallbacks,
        "arena_batches": stats.batches,
        "began": began,
        "ended": time.time(),
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """Per (kind, transport): medians over repetitions; ratios to stock of the same repetition."""
    lines = [
        f"{'kind':<9} {'transport':<13}{'steps/s':>8} {'±95%':>6} {'x stock':>8} {'wait ms':>8} "
        f"{'main ms':>8} {'x stock':>8} {'loop ms':>8} {'next ms':>8} {'wrk ms':>7} {'fb':>3} {'noise':>6}"
    ]
    lines.append("-" * len(lines[0]))
    ok = [r for r in rows if not r.get("skipped")]
    stock = {(r["kind"], r["rep"]): r for r in ok if r["transport"] == "stock"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((r["kind"], r["transport"]), []).append(r)
    order = (*TRANSPORTS, CONTROL)
    for (kind, transport), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        sps = [statistics.mean(r["rates"]) for r in rs]
        ci = [t95(len(r["rates"])) * statistics.stdev(r["rates"]) / len(r["rates"]) ** 0.5 for r in rs]
        vs = [(r, stock[(kind, r["rep"])]) for r in rs if (kind, r["rep"]) in stock]
        x_sps = statistics.median(statistics.mean(r["rates"]) / statistics.mean(s["rates"]) for r, s in vs) if vs else float("nan")
        x_cpu = statistics.median(r["main_cpu_ms"] / s["main_cpu_ms"] for r, s in vs) if vs else float("nan")
        lines.append(
            f"{kind:<9} {transport:<13}{statistics.median(sps):>8.2f} {statistics.median(ci):>6.2f} {x_sps:>8.3f} "
            f"{med('wait_ms'):>8.2f} {med('main_cpu_ms'):>8.2f} {x_cpu:>8.2f} {med('loop_cpu_ms'):>8.2f} "
            f"{med('next_cpu_ms'):>8.2f} {med('worker_cpu_ms'):>7.1f} {max(r['fallbacks'] for r in rs):>3} "
            f"{max(r['noise_pct'] for r in rs):>5.0f}%"
        )
    if ok:
        lines.append(
            f"memcpy of 32 MiB (pre-faulted): {statistics.median(r['memcpy_ms'] for r in ok):.2f} ms alone, "
            f"{statistics.median(r['memcpy_shared_ms'] for r in ok):.2f} ms while both cores copy"
        )
    lines.append(
        "per step, medians over repetitions: wait = time the loop waits for a batch; main = main-process "
        "CPU (all threads: loop, feeder, torch's queue threads); loop = the loop thread's CPU besides "
        "next() (reading the batch + the step); next = CPU of next() (the restore), in the loop thread "
        "or the feeder; wrk = all workers' CPU; x stock = ratio to stock of the same repetition; noise = "
        "CPU other processes used meanwhile, % of the machine (max over repetitions)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["numpy", COLLATED_KIND], choices=["numpy", "torch", COLLATED_KIND])
    ap.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=[*TRANSPORTS, CONTROL])
    ap.add_argument("--step-ms", type=float, default=30.0, help="CPU of the step's matmuls, one core (default 30)")
    ap.add_argument("--step-n", type=int, default=128, help="matmul size (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="alternations of the transports (default 3)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--per-window", type=int, default=40, help="steps per timed window (default 40)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    # run_child imports this module by name in a fresh interpreter.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    reps = calibrate_step(args.step_ms, args.step_n)
    print(f"step: {reps} x {args.step_n}x{args.step_n} matmuls ~ {args.step_ms:g} ms of one core", flush=True)
    rows = []
    for rep in range(args.reps):
        for kind in args.kinds:
            k = rep % len(args.transports)
            for transport in [*args.transports[k:], *args.transports[:k]]:
                payload = {
                    "kind": kind, "transport": transport, "step_n": args.step_n, "step_reps": reps,
                    "warmup": 8, "per_window": args.per_window, "windows": args.windows,
                }
                child = run_child("overlap:measure", payload, pss_interval=0.5)
                row = {**(child["raw"] or payload), "rep": rep, "noise_pct": child["noise_pct"], "skipped": child["skipped"]}
                rows.append(row)
                note = child["skipped"] or (
                    f"{statistics.mean(row['rates']):.2f} steps/s, main {row['main_cpu_ms']:.2f} ms/step, "
                    f"noise {child['noise_pct']:.0f}%"
                )
                print(f"[rep {rep}] {kind} {transport}: {note}", flush=True)
    text = f"step {args.step_n}x{args.step_n} matmuls x {reps} (~{args.step_ms:g} ms)\n" + summarize(rows)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overlap.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "overlap.txt"), "w") as f:
        f.write(text + "\n")
    return 0 if all(not r["skipped"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
