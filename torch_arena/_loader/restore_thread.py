"""A restore thread for copy-out arenas: the copy overlaps the training step,
and at most one batch is restored ahead of the loop.

A batch is restored where torch's worker queue is read: unpickling its
envelope *is* the restore. For the pool that costs almost nothing. For a ring
it is a copy of the whole batch into recycled private memory, and in the main
thread the training loop waits for it at every ``next()``. Measured
(``benchmarks/overlap.py``, 32 MiB numpy items, a 30 ms step, 2 workers):
inline, the loop waited 5.3 ms per step and ran at 0.99× stock's steps/s;
with the copy in a thread that hands batches on through a queue, it waited
0.03 ms and ran at 1.11× (the zero-copy pool: 1.13×), for the same
main-process CPU. ``numpy.copyto`` releases the GIL, so the copy runs beside
the step.

torch already has such a thread for ``pin_memory``: it reads the worker
queue, hands batches to the loop through a ``queue.Queue``, and torch's
iterator knows how to wait on it, notice it died, and stop it on shutdown.
When no pin-memory thread runs, :func:`start_restore_thread` starts one that
only reads and hands on, in the same slots.

Copy-out memory stays bounded. Restored everything it read, the thread would
hold in private memory every batch torch's reorder buffer and its queue keep
(with 600 MiB batches: 1.25 GiB above stock). Instead batches arrive as
:class:`~torch_arena._loader.session.DeferredBatch` (no copy; the unit stays
held in the arena, inside the budget), the thread restores one only while
fewer than :data:`RESTORE_AHEAD` restored batches wait for the loop (so,
counting the one it is copying, at most that many exist beyond what the loop
holds), and the loop restores any other one when it takes it
(:func:`resolve`). Measured with 600 MiB batches, 2 workers, a slow step: the
training process held 2400 MiB of private copies at peak before, 1800 MiB
after (the loop's batch, the previous one while ``next()`` runs, one ahead);
stock holds none (its batches are shared memory).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

from torch_arena._loader.session import DeferredBatch
from torch_arena._loader.wire import failed_restore

__all__ = ["RESTORE_AHEAD", "RestoreAhead", "resolve", "start_restore_thread"]

#: Restored batches that may wait for the loop (beyond the one being copied).
RESTORE_AHEAD = 1


class RestoreAhead:
    """How many batches the thread restored that the loop has not taken yet.

    Two counters, each written by one side (plain int stores under the GIL):
    the thread counts what it restored, the loop what it took; a reset (an
    epoch of persistent workers: torch drops what was in flight) takes all.
    """

    def __init__(self, limit: int = RESTORE_AHEAD) -> None:
        self.limit = limit
        self.restored = 0
        self.taken = 0

    def may_restore(self) -> bool:
        return self.restored - self.taken < self.limit

    def reset(self) -> None:
        self.taken = self.restored


class _Restored:
    """A batch the restore thread restored ahead of the loop."""

    __slots__ = ("batch", "ahead")

    def __init__(self, batch: Any, ahead: RestoreAhead) -> None:
        self.batch, self.ahead = batch, ahead


def _restore(deferred: DeferredBatch) -> Any:
    try:
        return deferred.restore()
    except Exception:  # noqa: BLE001 - re-raised for this batch by torch
        return failed_restore()


def resolve(data: Any) -> Any:
    """The batch for the loop: restored ahead (counted as taken), or restored now."""
    kind = type(data)
    if kind is _Restored:
        data.ahead.taken += 1
        return data.batch
    if kind is DeferredBatch:
        return _restore(data)
    return data


def _restore_loop(in_queue: Any, out_queue: queue.Queue, done_event: threading.Event, ahead: RestoreAhead) -> None:
    while not done_event.is_set():
        try:
            item = in_queue.get(timeout=MP_STATUS_CHECK_INTERVAL)
        except queue.Empty:
            continue
        except Exception:  # noqa: BLE001
            # Nothing to hand on (no index): a dead worker is reported by the
            # iterator's own status checks, in the training thread.
            continue
        if isinstance(item, tuple) and len(item) == 2 and type(item[1]) is DeferredBatch and ahead.may_restore():
            batch = _restore(item[1])
            ahead.restored += 1
            item = (item[0], _Restored(batch, ahead))
        while not done_event.is_set():
            try:
                out_queue.put(item, timeout=MP_STATUS_CHECK_INTERVAL)
                break
            except queue.Full:
                continue
        del item


def start_restore_thread(iterator: Any) -> RestoreAhead:
    """Restore ``iterator``'s batches in a thread of their own, through torch's
    pin-memory slots (``iterator`` is torch's multi-process iterator, just
    made, with no pin-memory thread); returns the restore-ahead counters that
    the iterator's ``_process_data`` and ``_reset`` keep."""
    done_event = threading.Event()
    out_queue: queue.Queue = queue.Queue()
    ahead = RestoreAhead()
    thread = threading.Thread(
        target=_restore_loop,
        args=(iterator._worker_result_queue, out_queue, done_event, ahead),
        name="torch_arena-restore",
        daemon=True,
    )
    iterator._pin_memory_thread_done_event = done_event
    iterator._data_queue = out_queue
    thread.start()
    iterator._pin_memory_thread = thread
    # torch's iterator waits on the thread (and notices it died) under this flag;
    # its multi-process path pins nothing itself.
    iterator._pin_memory = True
    if iterator._persistent_workers:
        iterator._register_persistent_workers_atexit()
    return ahead
