"""Benchmark matrix constants, one configuration (:class:`Config`) and its result (:class:`Result`)."""

from __future__ import annotations

import dataclasses

MiB = 1 << 20
ITEM_KINDS = ("bytes", "numpy", "torch", "packets")
#: Batches of 8 tensor samples stacked by default_collate.
COLLATED_KIND = "torch-x8"
KINDS = (*ITEM_KINDS, COLLATED_KIND)
#: ``ring``: ``arena="ring"`` (the elastic ring); ``ring-fixed``: a user-made
#: :class:`~torch_arena.SharedMemoryRingBuffer` of the same budget (SPDL's fixed ring).
RING_FIXED = "ring-fixed"
TRANSPORTS = ("stock", "ring", RING_FIXED, "pool")
SPDL = "spdl-pool"
DATASET_ONLY = "dataset-only"
ALL_TRANSPORTS = (*TRANSPORTS, SPDL, DATASET_ONLY)
SIZES_MIB = (2, 8, 32)
WORKERS = 2
PREFETCH = 2
#: Slack per arena unit beyond the payload (alignment, the odd small binary).
_UNIT_SLACK = 64 << 10
#: Length of the (virtual) datasets: iteration stops after the timed windows.
_ENDLESS = 1 << 40


# -- configuration and result ----------------------------------------------------


@dataclasses.dataclass
class Config:
    """One benchmark configuration (runs in its own process)."""

    kind: str
    size_mib: float
    transport: str
    per_window: int
    windows: int = 5
    workers: int = WORKERS
    step_reps: int = 0
    """Simulated training step: matmul repetitions per batch (0: none)."""
    step_ms: float = 0.0
    """What ``step_reps`` was calibrated to, for the report."""
    touch: bool = False
    """Read one byte of every page of the batch in the main loop (as a step
    that uses the batch would; mapping fresh memory costs page faults)."""
    slots: int = 0
    """Arena units (pool segments / ring batches); 0: the loader's default
    (``num_workers * prefetch_factor + 2``)."""
    min_window_s: float = 0.5
    """Shortest timed window: more batches per window when they come faster."""
    item_sleep_ms: float = 0.0
    """The dataset sleeps this long per item (to pace a run, e.g. the
    dataset-only floor at another run's batch rate)."""

    @property
    def batch_bytes(self) -> int:
        return int(self.size_mib * MiB)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size_mib:g} MiB {self.transport}"


@dataclasses.dataclass
class Result:
    """What one configuration measured. Per-batch figures are in milliseconds."""

    kind: str
    size_mib: float
    transport: str
    batch_bytes: int = 0
    batches: int = 0
    items_per_s: float = 0.0
    mb_per_s: float = 0.0
    mb_per_s_lo: float = 0.0
    mb_per_s_hi: float = 0.0
    main_cpu_ms: float = 0.0
    worker_cpu_ms: float = 0.0
    worker_cpu_check: float = 0.0
    dataset_ms: float = float("nan")
    worker_xfer_ms: float = float("nan")
    memcpy_ms: float = 0.0
    memcpy_gbps: float = 0.0
    memcpy_shared_ms: float = 0.0
    """One memcpy of the batch while every worker's core copies at once."""
    xfer_memcpy_ratio: float = float("nan")
    peak_pss_mb: float = 0.0
    arena_batches: int = 0
    fallbacks: int = 0
    arena_high_water: int = 0
    """Most arena units in use at once."""
    private_fresh: int = 0
    """Copy-out restores into freshly mapped private buffers (main process, whole run)."""
    private_reused: int = 0
    """Copy-out restores into recycled private buffers (main process, whole run)."""
    wait_ms: float = 0.0
    step_cpu_ms: float = 0.0
    """CPU of the simulated step's matmuls (main thread)."""
    touch_ms: float = 0.0
    """CPU of reading one byte per page of the batch (main thread)."""
    step_ms: float = 0.0
    wall_s: float = 0.0
    noise_pct: float = float("nan")
    """CPU other processes used meanwhile, % of the machine (see :func:`run_config`)."""
    workers: int = 0
    """Worker processes (threads, for SPDL) the run used."""
    start_method: str = ""
    """How the run started its workers (``fork``, ``spawn``, ``forkserver``; ``threads``)."""
    skipped: str = ""

    @property
    def key(self) -> tuple[str, float]:
        return (self.kind, self.size_mib)
