"""Hash table resizes beside the loop: one worker thread, one resize in flight.

A hashsize write rehashes every conntrack entry of every namespace while the kernel holds
all bucket locks: 103 ms at 262,144 entries, 392 ms at 1,000,000 (bench/README.md). Done on
the loop, the watchdog ping, `status`, the journal follower and the next sample all waited
for it. Here the write runs in a thread (os.write releases the GIL for the syscall), the loop
goes on, and the outcome comes back through a pipe registered in the loop's selector: an
event like a kernel line, read back and reported as before.

The bump of max is never behind it: `act` writes max first, then hands the resize here and
returns at once. `start` only queues it; the loop calls `launch` once the turn's files are
written, and writes no file while the kernel rehashes: with softirqs held off on one CPU for
the whole rehash, an fsync (its I/O completion) waited for it (bench/bench_resize.py: a turn's
state save took 422 ms during a 1,000,000-entry resize).

The rehash also holds that CPU with preemption off: a thread queued on it waits for the end.
The worker wakes the loop as it starts (Thread.start waits for it), and the scheduler puts the
woken loop on the waker's CPU: the loop then missed its watchdog pings for 35-140 ms of a
1,000,000-entry resize. So while a resize runs, the worker keeps to one CPU and the loop's
thread to the others (`_Pinning`; nothing to do on a single CPU).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ctguard.core.model import Outcome, SetBuckets

Write = Callable[[int], int]        # writes hashsize, returns the value read back; raises OSError


class _Pinning:
    """The loop's thread off the worker's CPU while a resize runs (Linux: affinity is per thread,
    pid 0 is the calling thread). Every step is best effort: a refused affinity only costs latency."""

    def __init__(self) -> None:
        self._saved: set[int] | None = None
        self.worker_cpu: int | None = None

    def loop_off(self) -> None:
        """In the loop's thread, before the worker starts."""
        try:
            cpus = os.sched_getaffinity(0)
            if len(cpus) < 2:
                return
            worker = max(cpus)
            os.sched_setaffinity(0, cpus - {worker})
        except (AttributeError, OSError):
            return
        self._saved, self.worker_cpu = cpus, worker

    def worker_on(self) -> None:
        """In the worker thread, before the write."""
        if self.worker_cpu is not None:
            try:
                os.sched_setaffinity(0, {self.worker_cpu})
            except OSError:
                pass

    def restore(self) -> None:
        """In the loop's thread, once the worker is done."""
        if self._saved is not None:
            try:
                os.sched_setaffinity(0, self._saved)
            except OSError:
                pass
        self._saved = self.worker_cpu = None


class Resizer:
    """Runs `write(new)` for one SetBuckets at a time in a thread; `collect()` returns outcomes."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._action: SetBuckets | None = None      # queued or running
        self._done: list[Outcome] = []
        self._pin = _Pinning()
        self.started_at: float | None = None

    def fileno(self) -> int:
        """Readable when a resize has finished (register it in the loop's selector)."""
        return self._r

    @property
    def target(self) -> int | None:
        """Buckets the resize in flight asks for, or None when none is."""
        action = self._action
        return action.new if action is not None else None

    def busy(self) -> bool:
        """A resize is queued or running (the next one waits for its outcome)."""
        return self._action is not None

    def running(self) -> bool:
        """The kernel is rehashing now (or the worker is finishing): write no file."""
        return self._thread is not None

    def start(self, action: SetBuckets) -> Outcome:
        """Queue the resize (`launch` runs it), or say why not; never waits for the kernel."""
        if self._action is not None:
            return Outcome(action, True, f"a resize to {self._action.new} buckets is in flight; "
                                         f"{action.new} waits for its outcome", pending=True)
        self._action = action
        return Outcome(action, True, f"resizing buckets {action.old} -> {action.new} beside the loop", pending=True)

    def launch(self) -> None:
        """Start the queued resize in the worker thread (no-op when none is queued or one runs)."""
        if self._action is None or self._thread is not None:
            return
        self.started_at = time.monotonic()
        self._pin.loop_off()
        self._thread = threading.Thread(target=self._run, args=(self._action,), name="ctguard-resize", daemon=True)
        self._thread.start()

    def _run(self, action: SetBuckets) -> None:
        took = 0.0
        self._pin.worker_on()
        t = time.monotonic()
        try:
            got = self._write(action.new)
        except OSError as exc:
            took = time.monotonic() - t
            outcome = Outcome(action, False, f"{exc} (max was still raised; buckets stay at {action.old})",
                              extra={"seconds": took})
        except Exception as exc:  # a bug must not leave the resize "in flight" for ever
            outcome = Outcome(action, False, f"resize failed unexpectedly: {exc!r}")
        else:
            took = time.monotonic() - t
            outcome = Outcome(action, True, f"buckets {action.old} -> {got} in {took * 1000:.0f} ms",
                              read_back=got, extra={"seconds": took})
        with self._lock:
            self._done.append(outcome)
        try:
            os.write(self._w, b"x")
        except OSError:
            pass    # the pipe is full or closed: collect() still finds the outcome

    def collect(self) -> list[Outcome]:
        """Outcomes of finished resizes (empty while one runs); frees the slot for the next."""
        try:
            while os.read(self._r, 64):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            done, self._done = self._done, []
        if done:
            if self._thread is not None:
                self._thread.join()
                self._pin.restore()
            self._thread = None
            self._action = None
            self.started_at = None
        return done

    def wait(self, timeout: float) -> list[Outcome]:
        """At stop: give a resize in flight `timeout` seconds to finish, then collect. A queued
        one that never started is dropped (the next start decides again)."""
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._action is not None:
            self._action = None
        return self.collect()

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
