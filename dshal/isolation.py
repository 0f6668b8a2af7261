"""Run a plugin's loading code so that nothing it does can hang or kill the caller.

A plugin's import, registration, declaration and device probe run in a daemon thread joined
with a time limit: :data:`ENV` (``DSHAL_PLUGIN_TIMEOUT``, seconds, default
:data:`DEFAULT_TIMEOUT`; ``0`` runs the code in the calling thread with no limit). A plugin
that overruns is reported as broken with that reason while its thread is left behind (Python
cannot stop a thread; it is a daemon, so it never keeps the process alive).

Every ``BaseException`` the code raises is caught and returned, ``SystemExit`` and
``KeyboardInterrupt`` included: in the worker thread those can only come from the plugin
(signals are delivered to the main thread), while a Ctrl-C the *user* presses during loading
interrupts the main thread's wait and propagates as usual. Without a limit the code runs in
the calling thread, where the two cannot be told apart: a ``KeyboardInterrupt`` propagates.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from dshal.errors import DshalValueError

ENV = "DSHAL_PLUGIN_TIMEOUT"
#: seconds a plugin may take to import, register, declare and probe
DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """What running the code gave: its value, what it raised, or that it timed out."""

    value: T | None = None
    error: BaseException | None = None
    timed_out: bool = False


def timeout() -> float | None:
    """The time limit in seconds from :data:`ENV` (``None``: no limit)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0 or seconds == float("inf"):
        raise DshalValueError(f"{ENV}={raw!r} (allowed: a number of seconds >= 0; 0 = no "
                              f"limit; default {DEFAULT_TIMEOUT:g})")
    return seconds or None


def run_isolated(fn: Callable[[], T], name: str, limit: float | None) -> Outcome[T]:
    """Run ``fn()`` isolated: within ``limit`` seconds (``None``: no limit, in this thread),
    every exception it raises caught and returned."""
    outcome: Outcome[T] = Outcome()

    def work() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:  # isolation is the point
            outcome.error = exc

    if limit is None:
        work()
        if isinstance(outcome.error, KeyboardInterrupt):
            raise outcome.error  # in the caller's thread a Ctrl-C may be the user's: honour it
        return outcome
    worker = threading.Thread(target=work, name=f"dshal-load-{name}", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        return Outcome(timed_out=True)
    return outcome
