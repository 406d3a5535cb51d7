"""Run one fault scenario and watch it from outside.

Usage: ``python _harness.py --timeout T --settle S -- CMD ...``

The harness is the leader of its own session (the test starts it with
``start_new_session``; under ``unshare --mount`` it is exec'd, so it also sees
the private ``/dev/shm``). It:

* becomes a child subreaper, so workers orphaned by a dead scenario are
  re-parented to it and can be seen and reaped here;
* runs ``CMD`` in a new process group of the same session, with a hard timeout
  (SIGKILL to the whole group when it expires: a hang is reported, never
  waited on);
* forwards the scenario's requests for signals: a stdout line
  ``@@SIGNAL-GROUP <signum>`` makes the harness send that signal to the
  scenario's whole process group, as a terminal's Ctrl-C does;
* after the scenario exits, waits up to ``--settle`` seconds for every other
  process of the session to go, then kills and reports whatever is left;
* reports new entries in ``/dev/shm``.

The last stdout line is one JSON object (see :func:`main`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import threading
import time

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


def _reap() -> None:
    """Collect exited children (orphans re-parented to us included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _session_members(sid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of session ``sid`` other than this one."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            state, session = fields[0], int(fields[3])
            if session != sid or state in (b"Z", b"X"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        found.append((pid, cmd))
    return found


def _list_shm() -> list[str]:
    try:
        return sorted(os.listdir("/dev/shm"))
    except OSError:
        return []


def _own_group_default_sigint() -> None:
    """In the child before exec: its own process group, and SIGINT at its
    default, as a program started from a terminal has it. Python installs its
    KeyboardInterrupt handler only where SIGINT is not ignored at start, and a
    launcher may pass it down ignored (a background job of a non-interactive
    shell, nohup): the Ctrl-C scenarios would then never be interrupted."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--settle", type=float, default=8.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    _set_subreaper()
    sid = os.getsid(0)
    shm_before = _list_shm()
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split(" - ")[-1].strip() for line in f if " /dev/shm " in line]
    shm_mount = mounts[-1] if mounts else ""  # the last mount on /dev/shm is the visible one
    stat = os.statvfs("/dev/shm")
    shm_size = stat.f_blocks * stat.f_frsize

    started = time.monotonic()
    env = dict(os.environ, FAULTS_DUMP_AFTER=str(max(1.0, args.timeout - 3.0)))
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_own_group_default_sigint,  # noqa: PLW1509 - no thread runs yet
    )
    out_lines: list[str] = []
    err_chunks: list[str] = []
    signals_sent: list[int] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith("@@SIGNAL-GROUP "):
                signum = int(line.split()[1])
                try:
                    os.killpg(proc.pid, signum)
                    signals_sent.append(signum)
                except ProcessLookupError:
                    pass

    def read_stderr() -> None:
        assert proc.stderr is not None
        err_chunks.append(proc.stderr.read())

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
    elapsed = time.monotonic() - started

    # The scenario is gone; give whatever it started a moment to follow.
    settle_start = time.monotonic()
    members = _session_members(sid)
    while members and time.monotonic() - settle_start < args.settle:
        _reap()
        time.sleep(0.05)
        members = _session_members(sid)
    settle_seconds = time.monotonic() - settle_start
    orphans = [cmd for _, cmd in members]
    for pid, _ in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap()
    for t in readers:
        t.join(timeout=5)
    shm_after = _list_shm()
    report = {
        "rc": rc,
        "timed_out": timed_out,
        "elapsed": round(elapsed, 3),
        "settle_seconds": round(settle_seconds, 3),
        "orphans": orphans,
        "shm_new": sorted(set(shm_after) - set(shm_before)),
        "shm_mount": shm_mount,
        "shm_size": shm_size,
        "signals_sent": signals_sent,
        "stdout": "".join(out_lines),
        "stderr": "".join(err_chunks),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
