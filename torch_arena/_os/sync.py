"""Cross-process locking and wake-ups built on file descriptors.

``multiprocessing.Lock``/``Condition`` are tied to the start method that made
them (a fork-context lock cannot go to a spawn child) and a lock held by a
process that is SIGKILLed stays held forever. The primitives here avoid both:

* :class:`ProcessLock` is ``flock`` on a private open-file description of the
  arena's memory file. Each process re-opens the file through
  ``/proc/self/fd`` so processes exclude one another, a per-process
  ``threading.Lock`` excludes threads, and the kernel drops the lock when a
  holder dies.
* :class:`Wakeup` is a non-blocking pipe: a release writes one byte, a waiter
  polls the read end. Wake-ups are hints, never state: waiters always re-check
  the shared header under the lock, and poll with a bounded slice so even a
  lost byte costs at most one slice.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading

__all__ = ["ProcessLock", "Wakeup", "current_pid", "holds_arena_lock", "pid_alive"]

_WAIT_SLICE_S = 0.05
_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


_held = threading.local()


def holds_arena_lock() -> bool:
    """Whether this thread holds some arena's lock right now (code that the
    garbage collector can run inside an arena call checks it: the locks are
    not reentrant)."""
    return getattr(_held, "depth", 0) > 0


def current_pid() -> int:
    """This process's id, without a system call per use (kept right across fork)."""
    return _pid


class ProcessLock:
    """A mutex shared by every process and thread that holds the memory file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pid = -1
        self._ofd = -1
        self._thread_lock = threading.Lock()

    def _ensure_process_state(self) -> None:
        pid = _pid
        if self._pid == pid:
            return
        # A new process (fork child or unpickled copy): the inherited thread lock
        # may have been held by a thread that does not exist here, and the
        # inherited open-file description is shared with the parent.
        self._thread_lock = threading.Lock()
        try:
            self._ofd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
            self._use_flock = True
        except OSError:  # pragma: no cover - no /proc: per-process POSIX lock
            self._ofd = self._fd
            self._use_flock = False
        self._pid = pid

    def _lock_file(self) -> None:
        # Called with the thread lock held. The try starts right after the
        # thread lock is taken, with no call in between: a KeyboardInterrupt
        # raised when _lock_file is entered must still give the thread lock back.
        if self._use_flock:
            fcntl.flock(self._ofd, fcntl.LOCK_EX)
        else:  # pragma: no cover
            fcntl.lockf(self._ofd, fcntl.LOCK_EX)

    def acquire(self) -> None:
        """Block until this thread holds the lock."""
        self._ensure_process_state()
        self._thread_lock.acquire()
        try:
            self._lock_file()
        except BaseException:
            self._thread_lock.release()
            raise
        _held.depth = getattr(_held, "depth", 0) + 1

    def try_acquire_thread(self) -> bool:
        """Take the lock only if no thread of this process holds it right now."""
        self._ensure_process_state()
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            self._lock_file()
        except BaseException:
            self._thread_lock.release()
            raise
        _held.depth = getattr(_held, "depth", 0) + 1
        return True

    def release(self) -> None:
        """Release a lock taken with :meth:`acquire` or :meth:`try_acquire_thread`."""
        _held.depth = getattr(_held, "depth", 1) - 1
        try:
            if self._use_flock:
                fcntl.flock(self._ofd, fcntl.LOCK_UN)
            else:  # pragma: no cover
                fcntl.lockf(self._ofd, fcntl.LOCK_UN)
        finally:
            # A KeyboardInterrupt raised by the signal handler right after the
            # unlock must not leave the thread lock held: the next acquire in
            # this thread would wait forever.
            self._thread_lock.release()

    def __del__(self) -> None:
        # The private descriptor is a second reference to the memory file: left
        # open, it would keep the whole arena allocated until the process exits.
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Close this process's private descriptor (the shared one is not ours)."""
        if self._pid == _pid and self._ofd >= 0 and self._ofd != self._fd:
            os.close(self._ofd)
        self._ofd = -1
        self._pid = -1


class Wakeup:
    """Release notifications over a non-blocking pipe."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    @classmethod
    def create(cls) -> "Wakeup":
        """A fresh pipe, non-blocking at both ends, closed on exec."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return cls(r, w)

    def notify(self) -> None:
        """Wake waiters; a full pipe already holds enough wake-ups."""
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout: float) -> None:
        """Sleep until a notification or ``min(timeout, slice)`` seconds pass."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        if poller.poll(max(0.0, min(timeout, _WAIT_SLICE_S)) * 1000.0):
            try:
                os.read(self.read_fd, 1)
            except (BlockingIOError, OSError):
                pass

    def close(self) -> None:
        """Close both ends in this process."""
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True
