"""Ctrl-C that loses nothing: long loops ask :func:`stop_requested` at each step boundary, write their checkpoint
and raise :class:`~trojanlab.errors.Interrupted` (the command line exits 130 with one line saying how to resume).
A second Ctrl-C stops at once.

Checkpoints are also written every ``TROJANLAB_CHECKPOINT_MINUTES`` minutes (default 5; 0: after every step), so
that a run killed without warning (SIGKILL, a power cut) loses at most that much work.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

from .errors import ConfigError, Interrupted

_requested = threading.Event()
_depth = 0


def checkpoint_interval() -> float:
    """Seconds between periodic checkpoints (``TROJANLAB_CHECKPOINT_MINUTES``, default 5)."""
    text = os.environ.get("TROJANLAB_CHECKPOINT_MINUTES", "5")
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes >= 0:  # also NaN
        raise ConfigError(f"TROJANLAB_CHECKPOINT_MINUTES={text!r}: expected a number of minutes >= 0")
    return minutes * 60.0


@contextmanager
def graceful_interrupts():
    """Within this block the first SIGINT only sets a flag (read by :func:`stop_requested`); the second raises
    ``KeyboardInterrupt`` as usual. Outside the main thread nothing changes."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # a process told to ignore Ctrl-C (a background job) keeps ignoring it
        yield
        return

    def handler(signum, frame):
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()

    if _depth == 0:
        _requested.clear()
        signal.signal(signal.SIGINT, handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGINT, previous)
            pending = _requested.is_set()
            _requested.clear()
    if _depth == 0 and pending:  # the loop ended before it could act on Ctrl-C: the user still asked to stop
        raise Interrupted("interrupted; the work finished so far is checkpointed where this command keeps "
                          "checkpoints: run the same command again to resume")  # fmt: skip


def stop_requested() -> bool:
    """Whether the user pressed Ctrl-C since the enclosing :func:`graceful_interrupts` began."""
    return _requested.is_set()


class Periodic:
    """``due()`` is true once every ``interval`` seconds (always, for 0)."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = checkpoint_interval() if interval is None else interval
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False
