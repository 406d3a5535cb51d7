"""Helpers shared by the integration tests (Accelerate, torchdata, torchrun).

They look at the process from outside torch_arena's internals: which memory
mapping a tensor lies in, which arena memory files are open, which child
processes are alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

ARENA_MEMFD = "/memfd:torch_arena"  # the name torch_arena gives its memory files


IMAGE = (3, 32, 32)  # 12 KiB per sample: every batch goes through the arena


class Images(Dataset):
    """Sample ``i``: ``(i, an image filled with i)``."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.full(IMAGE, float(i))


class Stream(IterableDataset):
    """Each worker streams its share of ``range(n)`` as ``(i, image)``,
    keeping its position in ``pos`` (no state_dict: torchdata resumes it by
    re-reading)."""

    def __init__(self, n: int = 60) -> None:
        self.n, self.pos = n, 0

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        items = list(range(wid, self.n, nw))
        if self.pos >= len(items):
            self.pos = 0  # a new epoch
        while self.pos < len(items):
            i = items[self.pos]
            self.pos += 1
            yield i, torch.full(IMAGE, float(i))


def mapping_of(address: int) -> str:
    """The path of the /proc/self/maps entry holding ``address`` ('' if anonymous or none)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def in_arena_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage lies in an arena's memory file (a zero-copy pool view)."""
    return mapping_of(tensor.untyped_storage().data_ptr()).startswith(ARENA_MEMFD)


def arena_files_open() -> int:
    """How many descriptors of this process refer to an arena memory file."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(ARENA_MEMFD)
        except OSError:
            pass
    return count


def arena_mappings() -> int:
    """How many mappings of arena memory files this process has."""
    with open("/proc/self/maps") as maps:
        return sum(ARENA_MEMFD in line for line in maps)


def live_children() -> list[int]:
    """Pids of this process's children that are still running (zombies reaped)."""
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]


def wait_no_children(before: list[int], seconds: float = 10.0) -> list[int]:
    """Children not in ``before`` still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        extra = sorted(set(live_children()) - set(before))
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.1)


def run_tree(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its
    own: on timeout the whole process group is killed (torchrun, its ranks and
    their DataLoader workers), not only ``cmd`` (CPython gh-112275 can hang a
    rank in ``os.fork``), and the timeout is raised with what was printed."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind in its group
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
