"""Running configurations from the parent: fresh processes, memory sampling, the matrix."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._config import DATASET_ONLY, SPDL, Config, Result
from ._measure import _cpu_children, _cpu_self, t95
from ._payloads import packets_skip_reason, samples_per_batch, spdl_skip_reason

# -- orchestration (parent process) --------------------------------------------------


_SHM_PREFIXES = ("/dev/shm/", "/memfd:")


def _private_pss_kib(pid: int) -> int:
    """PSS of ``pid`` without its shared-memory-file pages (counted per file)."""
    pss = shmem = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Pss_Shmem:"):
                    shmem = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss - shmem


def _shm_files_kib(pid: int, files: dict[int, int]) -> None:
    """Add the allocated KiB of every shared-memory file ``pid`` maps or holds open."""
    paths = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            paths.append(f"/proc/{pid}/fd/{fd}")
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(_SHM_PREFIXES) and int(parts[4]) not in files:
                    paths.append(f"/proc/{pid}/map_files/{parts[0]}")
    except (OSError, ValueError):
        return
    for path in paths:
        try:
            if not os.readlink(path).startswith(_SHM_PREFIXES):
                continue
            st = os.stat(path)
        except OSError:
            continue
        files[st.st_ino] = st.st_blocks // 2


def tree_memory_kib(pids: Sequence[int]) -> int:
    """Memory of a process tree, each page once: PSS without shared-memory files,
    plus every shared-memory file mapped or held open by any of the processes,
    once. (torch's segments in flight between a worker and the main process are
    held by descriptors and mapped by nobody: PSS alone misses them.)"""
    files: dict[int, int] = {}
    private = 0
    for pid in pids:
        private += _private_pss_kib(pid)
        _shm_files_kib(pid, files)
    return private + sum(files.values())


class _PssSampler:
    """Samples the summed PSS of a process tree from another process."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(self.interval):
            try:
                pids = [self.pid] + [p.pid for p in root.children(recursive=True)]
            except psutil.Error:
                return
            self.samples.append((time.time(), tree_memory_kib(pids)))

    def peak_mb(self, began: float, ended: float) -> float:
        self._stop.set()
        self._thread.join()
        inside = [kib for t, kib in self.samples if began <= t <= ended]
        return max(inside) * 1024 / 1e6 if inside else float("nan")  # too short to sample


def _machine_busy() -> float:
    """CPU seconds all cores of the machine spent busy (``/proc/stat``), steal included."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_child(
    entry: str, payload: dict[str, Any], *, pss_interval: float = 0.1, timeout: float = 600.0
) -> dict[str, Any]:
    """Run ``entry`` (``"module:function"``, called with ``payload`` and returning
    a JSON-able dict with ``began``/``ended`` wall-clock times) in a fresh
    interpreter, sampling the memory of its process tree meanwhile.

    Returns ``{"raw": dict | None, "skipped": why or "", "peak_pss_mb",
    "wall_s", "noise_pct"}``. ``noise_pct``: CPU that processes outside this
    benchmark used while it ran (busy time from ``/proc/stat`` minus this
    process and the child's process tree), as a percentage of all cores.
    """
    busy0, self0, tree0 = _machine_busy(), _cpu_self(), _cpu_children()
    module, _, function = entry.partition(":")
    cmd = [
        sys.executable,
        "-c",
        f"import sys, json; from {module} import {function} as f; "
        "out = f(json.loads(sys.argv[1])); "
        "sys.stdout.write(chr(10) + 'RESULT ' + json.dumps(out) + chr(10)); sys.stdout.flush()",
        json.dumps(payload),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = _PssSampler(proc.pid, pss_interval)
    out: dict[str, Any] = {"raw": None, "skipped": "", "peak_pss_mb": float("nan"), "noise_pct": float("nan")}
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sampler.peak_mb(0, 0)
        return {**out, "skipped": f"timed out after {timeout:.0f} s", "wall_s": time.monotonic() - started}
    except BaseException:  # e.g. Ctrl-C: take the configuration's processes along
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    out["wall_s"] = time.monotonic() - started
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sampler.peak_mb(0, 0)
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return {**out, "skipped": f"failed (rc {proc.returncode}): {tail}"}
    raw = json.loads(line[len("RESULT ") :])
    out["raw"], out["peak_pss_mb"] = raw, sampler.peak_mb(raw["began"], raw["ended"])
    foreign = (_machine_busy() - busy0) - (_cpu_self() - self0) - (_cpu_children() - tree0)
    out["noise_pct"] = max(0.0, 100 * foreign / (out["wall_s"] * (os.cpu_count() or 1)))
    return out


def _measure_json(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_child` entry of one A/B configuration."""
    from ._measure import measure

    return measure(Config(**cfg_json))


def run_config(cfg: Config, *, pss_interval: float = 0.1, timeout: float = 600.0) -> Result:
    """Run ``cfg`` in a fresh interpreter (:func:`run_child`) and summarize what it measured."""
    child = run_child(f"{__name__}:_measure_json", dataclasses.asdict(cfg), pss_interval=pss_interval, timeout=timeout)
    if child["raw"] is None:
        return Result(cfg.kind, cfg.size_mib, cfg.transport, skipped=child["skipped"])
    result = summarize(cfg, child["raw"], child["peak_pss_mb"], child["wall_s"])
    result.noise_pct = child["noise_pct"]
    return result


def summarize(cfg: Config, raw: dict[str, Any], peak_pss_mb: float, wall_s: float) -> Result:
    """Per-batch figures from one child's raw measurements."""
    rates = raw["rates"]
    n = len(rates)
    mean = statistics.mean(rates)
    half = t95(n) * statistics.stdev(rates) / math.sqrt(n) if n > 1 else 0.0
    batches = n * raw["per_window"]
    mb = raw["batch_bytes"] / 1e6
    memcpy = raw["memcpy"]
    total_live = raw["worker_total_live"]
    return Result(
        kind=cfg.kind,
        size_mib=cfg.size_mib,
        transport=cfg.transport,
        batch_bytes=raw["batch_bytes"],
        batches=batches,
        items_per_s=mean,
        mb_per_s=mean * mb,
        mb_per_s_lo=(mean - half) * mb,
        mb_per_s_hi=(mean + half) * mb,
        main_cpu_ms=raw["main_cpu"] / batches * 1e3,
        worker_cpu_ms=raw["worker_cpu"] / batches * 1e3,
        worker_cpu_check=raw["worker_total_rusage"] / total_live if total_live else float("nan"),
        memcpy_ms=memcpy * 1e3,
        memcpy_gbps=raw["batch_bytes"] / memcpy / 1e9,
        memcpy_shared_ms=raw["memcpy_shared"] * 1e3,
        peak_pss_mb=peak_pss_mb,
        arena_batches=raw.get("arena_batches", 0),
        fallbacks=raw.get("fallbacks", 0),
        arena_high_water=raw.get("high_water", 0),
        private_fresh=raw.get("private_fresh", 0),
        private_reused=raw.get("private_reused", 0),
        wait_ms=raw["wait"] / batches * 1e3,
        step_cpu_ms=raw["step_cpu"] / batches * 1e3,
        touch_ms=raw["touch_cpu"] / batches * 1e3,
        step_ms=cfg.step_ms,
        wall_s=wall_s,
        workers=cfg.workers,
        start_method=raw.get("start_method", ""),
    )


def attach_dataset_cost(results: list[Result]) -> None:
    """Fill ``dataset_ms``, ``worker_xfer_ms`` and the memcpy ratio from the
    ``dataset-only`` row of the same kind and size (0 if there is none)."""
    cost = {r.key: r.worker_cpu_ms for r in results if r.transport == DATASET_ONLY and not r.skipped}
    for r in results:
        if r.skipped or r.transport == DATASET_ONLY:
            continue
        if r.key in cost:
            r.dataset_ms = cost[r.key]
            r.worker_xfer_ms = r.worker_cpu_ms - r.dataset_ms
            r.xfer_memcpy_ratio = r.worker_xfer_ms / r.memcpy_ms if r.memcpy_ms else float("nan")


def default_per_window(size_mib: float, window_mib: float, minimum: int = 8) -> int:
    """Batches per timed window: about ``window_mib`` of payload."""
    return max(minimum, round(window_mib / size_mib))


def build_matrix(
    kinds: Sequence[str],
    sizes: Sequence[float],
    transports: Sequence[str],
    *,
    window_mib: float,
    windows: int,
    **fields: Any,
) -> tuple[list[Config], list[str]]:
    """The configurations to run, and notes on what was left out and why.

    ``fields`` are further :class:`Config` fields, the same for every configuration.
    """
    notes = []
    if "packets" in kinds and (why := packets_skip_reason()):
        kinds = [k for k in kinds if k != "packets"]
        notes.append(f"packets skipped: {why}")
    if SPDL in transports and (why := spdl_skip_reason()):
        transports = [t for t in transports if t != SPDL]
        notes.append(f"{SPDL} skipped: {why}")
    configs = []
    for kind in kinds:
        for size in sizes:
            for transport in transports:
                if transport == SPDL and samples_per_batch(kind) > 1:
                    continue  # SPDL's peer row is for per-item payloads
                per_window = default_per_window(size, window_mib)
                configs.append(Config(kind, size, transport, per_window, windows, **fields))
    if SPDL in transports and any(samples_per_batch(k) > 1 for k in kinds):
        notes.append(f"{SPDL} is run for per-item payloads only (no collated rows)")
    return configs, notes


def run_matrix(
    configs: Sequence[Config],
    *,
    pss_interval: float = 0.1,
    progress: Callable[[str], None] | None = print,
    max_noise: float = float("inf"),
    retries: int = 0,
    previous: Sequence[Result] = (),
) -> list[Result]:
    """Run every configuration, each in its own process, one after another.

    A configuration during which other processes used more than ``max_noise``
    percent of the machine runs again, up to ``retries`` times; the quietest
    run is kept. A quiet enough result in ``previous`` (an earlier run read
    back with :func:`read_csv`) is kept instead of running its configuration.
    """
    kept = {(*r.key, r.transport): r for r in previous if not r.skipped and r.noise_pct <= max_noise}
    results = []
    for i, cfg in enumerate(configs, 1):
        old = kept.get((cfg.kind, cfg.size_mib, cfg.transport))
        if old is not None:
            results.append(old)
            if progress is not None:
                progress(f"[{i}/{len(configs)}] {cfg.label}: kept from the earlier run (noise {old.noise_pct:.0f}%)")
            continue
        runs = [run_config(cfg, pss_interval=pss_interval)]
        while not runs[-1].skipped and runs[-1].noise_pct > max_noise and len(runs) <= retries:
            if progress is not None:
                busy = runs[-1].noise_pct
                progress(f"[{i}/{len(configs)}] {cfg.label}: noisy ({busy:.0f}% of the machine busy elsewhere), again")
            runs.append(run_config(cfg, pss_interval=pss_interval))
        r = min(runs, key=lambda r: (bool(r.skipped), r.noise_pct))
        results.append(r)
        if progress is not None:
            if r.skipped:
                progress(f"[{i}/{len(configs)}] {cfg.label}: {r.skipped}")
            else:
                progress(
                    f"[{i}/{len(configs)}] {cfg.label}: {r.mb_per_s:.0f} MB/s, main "
                    f"{r.main_cpu_ms:.2f} ms, workers {r.worker_cpu_ms:.1f} ms per batch, "
                    f"peak {r.peak_pss_mb:.0f} MB, noise {r.noise_pct:.0f}% ({r.wall_s:.1f} s)"
                )
    attach_dataset_cost(results)
    return results
