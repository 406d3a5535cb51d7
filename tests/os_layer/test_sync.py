"""The arena lock under KeyboardInterrupt: an interrupt at any bytecode of an
acquire or a release must not leave the lock held for good."""

from __future__ import annotations

import signal
import threading
import time

import torch_arena as ta
from torch_arena._os.sync import holds_arena_lock


def _other_thread_gets(lock, timeout: float = 5.0) -> bool:
    got = threading.Event()

    def take():
        lock.acquire()
        got.set()
        lock.release()

    threading.Thread(target=take, daemon=True).start()
    return got.wait(timeout)


def _next_call_after(leak) -> None:
    """In one thread: ``leak(lock)`` (what an interrupt left behind), then the
    thread's next arena call (an acquire and a release). That call must not
    wait for the thread itself, must leave the thread holding nothing, and
    the lock must then be free for another thread."""
    arena = ta.SharedMemorySegmentPool(1 << 16, 2)
    lock = arena.file.lock
    done = threading.Event()

    def leak_then_call():
        leak(lock)
        lock.acquire()
        assert holds_arena_lock()
        lock.release()
        if not holds_arena_lock():
            done.set()

    threading.Thread(target=leak_then_call, daemon=True).start()
    assert done.wait(5.0), "the thread's next acquire waited for its own leaked lock"
    assert _other_thread_gets(lock)
    arena.close()


def test_an_acquire_interrupted_right_after_the_thread_lock_is_taken_over_by_the_next_acquire():
    """What a Ctrl-C does when it lands just after the thread lock was taken and
    before the ``try``: this thread's next arena call (the loader's shutdown at
    exit) must not wait for itself."""

    def interrupted_acquire(lock):
        lock._ensure_process_state()
        lock._thread_lock.acquire()  # the interrupted acquire's leftover

    _next_call_after(interrupted_acquire)


def test_a_release_interrupted_on_entry_is_finished_by_the_next_acquire_and_release():
    """A Ctrl-C on entry to release leaves the hold as it was; the next
    acquire/release pair in the thread ends it and the depth is right."""

    def interrupted_release(lock):
        lock.acquire()  # ... and the release never ran
        assert holds_arena_lock()

    _next_call_after(interrupted_release)


def test_sigint_storm_on_acquire_and_release_leaves_the_lock_usable():
    """Real SIGINTs, each landing wherever the main thread is in an acquire or
    a release, while a second thread (the lease reaper's part) takes the lock
    too, so that the main thread waits for it and is often interrupted right
    after getting it (what a Ctrl-C did in CI): after the storm, the thread's next
    acquire/release (what any next arena call does) must not hang and must
    leave the lock free for everyone."""
    arena = ta.SharedMemorySegmentPool(1 << 16, 2)
    lock = arena.file.lock
    main = threading.get_ident()
    stop = threading.Event()
    armed = False
    interrupts = 0

    def on_sigint(signum, frame):
        # One KeyboardInterrupt per arming, so it can only land inside the
        # try below, never in the test's own bookkeeping.
        nonlocal armed
        if armed:
            armed = False
            raise KeyboardInterrupt

    def on_alarm(signum, frame):
        raise AssertionError("the main thread's next acquire waited for its own leaked lock")

    def storm():
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.0002)

    def contend():
        while not stop.is_set():
            lock.acquire()
            time.sleep(0.0001)
            lock.release()
            time.sleep(0.0001)

    old_int = signal.signal(signal.SIGINT, on_sigint)
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    sender = threading.Thread(target=storm, daemon=True)
    contender = threading.Thread(target=contend, daemon=True)
    try:
        sender.start()
        contender.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                armed = True
                lock.acquire()
                lock.release()
                armed = False
            except KeyboardInterrupt:
                interrupts += 1
        stop.set()
        sender.join()
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        try:
            lock.acquire()
            lock.release()
            contender.join()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGALRM, old_alarm)
    assert interrupts > 100, interrupts
    assert not holds_arena_lock()
    assert _other_thread_gets(lock)
    arena.close()
