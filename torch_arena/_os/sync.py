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


_setup_lock = threading.Lock()  # one thread sets up a ProcessLock in a process


def _after_fork_in_child() -> None:
    global _pid, _setup_lock
    _pid = os.getpid()
    _setup_lock = threading.Lock()  # a parent's thread may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


class _HeldLocks(threading.local):
    depth = 0  # how many arena locks this thread holds


_held = _HeldLocks()


def holds_arena_lock() -> bool:
    """Whether this thread holds some arena's lock right now (code that the
    garbage collector can run inside an arena call checks it: the locks are
    not reentrant)."""
    return _held.depth > 0


def current_pid() -> int:
    """This process's id, without a system call per use (kept right across fork)."""
    return _pid


# NOTE [ Arena lock and KeyboardInterrupt ]
#
# Python runs a signal handler between two bytecodes, so a Ctrl-C can raise
# KeyboardInterrupt right after ``lock.acquire()`` returned and before the
# ``try`` that would give the lock back, or on entry to ``release``. A plain
# ``threading.Lock`` leaked that way is never released: the next arena call in
# that thread (the loader's shutdown at exit, a notebook's next cell) waits for
# itself forever. So the thread lock is an ``RLock``, whose owner is known:
#
# * ``acquire`` in a thread that already owns the lock treats it as leaked by
#   an interrupted acquire or release and takes over the hold, instead of
#   waiting for itself; the locks are never taken reentrantly on purpose
#   (``holds_arena_lock`` guards the one path that could).
# * ``_counted`` says whether the current hold is in this thread's ``depth``;
#   it is set and cleared with no call in between (no bytecode that runs a
#   signal handler), so ``depth`` is right whichever step was interrupted.
# * Every step after the thread lock is taken is inside a ``try`` whose
#   handler also undoes the ``flock``.


class ProcessLock:
    """A mutex shared by every process and thread that holds the memory file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pid = -1
        self._ofd = -1
        self._thread_lock = threading.RLock()
        self._counted = False

    def _ensure_process_state(self) -> None:
        if self._pid == _pid:
            return
        # A new process (fork child or unpickled copy): the inherited thread lock
        # may have been held by a thread that does not exist here, and the
        # inherited open-file description is shared with the parent. Two threads
        # may get here at once (the first use of a lock after a fork): one sets
        # up, and the process id is written last, once everything is in place.
        with _setup_lock:
            pid = _pid
            if self._pid == pid:
                return
            try:
                ofd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
                use_flock = True
            except OSError:  # pragma: no cover - no /proc: per-process POSIX lock
                ofd = self._fd
                use_flock = False
            self._thread_lock = threading.RLock()
            self._counted = False
            self._ofd, self._use_flock = ofd, use_flock
            self._pid = pid

    def _lock_file(self) -> None:
        if self._use_flock:
            fcntl.flock(self._ofd, fcntl.LOCK_EX)
        else:  # pragma: no cover
            fcntl.lockf(self._ofd, fcntl.LOCK_EX)

    def _unlock_file(self) -> None:
        if self._use_flock:
            fcntl.flock(self._ofd, fcntl.LOCK_UN)
        else:  # pragma: no cover
            fcntl.lockf(self._ofd, fcntl.LOCK_UN)

    def _count_hold(self) -> None:
        if not self._counted:
            self._counted = True
            _held.depth += 1

    def _give_back(self) -> None:
        # The failure path of an acquire: nothing of the hold may stay behind.
        if self._counted:
            self._counted = False
            _held.depth -= 1
        try:
            self._unlock_file()  # harmless when the flock was not taken
        finally:
            if self._thread_lock._is_owned():
                self._thread_lock.release()

    def acquire(self) -> None:
        """Block until this thread holds the lock (see NOTE [ Arena lock and
        KeyboardInterrupt ])."""
        self._take(True)

    def try_acquire_thread(self) -> bool:
        """Take the lock only if no thread of this process holds it right now."""
        return self._take(False)

    def _take(self, blocking: bool) -> bool:
        self._ensure_process_state()
        lock = self._thread_lock
        if not lock._is_owned() and not lock.acquire(blocking):
            return False
        # No call between taking the thread lock and this try but the
        # interrupt check after acquire() itself (an owned lock is taken over
        # by the next acquire).
        try:
            self._lock_file()
            self._count_hold()
        except BaseException:
            self._give_back()
            raise
        return True

    def release(self) -> None:
        """Release a lock taken with :meth:`acquire` or :meth:`try_acquire_thread`."""
        if self._counted:
            self._counted = False
            _held.depth -= 1
        try:
            self._unlock_file()
        finally:
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
