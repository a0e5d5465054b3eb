"""Ctrl-C and SIGTERM: a graceful stop where the work can save a resumable state, else an interrupt.

Inside `graceful_stop()` (training) the first SIGINT or SIGTERM only sets a flag that the loops
poll with `stop_requested()` between steps; they save their state and return. A second signal,
or any signal outside such a block, raises KeyboardInterrupt at once (outputs already written
stay: every file is written under a temporary name and renamed).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator

logger = logging.getLogger(__name__)

_stop = threading.Event()
_graceful_depth = 0


class Interrupted(Exception):
    """Raised by a loop that saw `stop_requested()` and has nothing of its own to save."""


def stop_requested() -> bool:
    """True once a signal asked a graceful block to stop."""
    return _stop.is_set()


def request_stop() -> None:
    """Ask the running graceful block to stop at its next step (what the first signal does)."""
    _stop.set()


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Within the block the first SIGINT/SIGTERM requests a stop instead of raising KeyboardInterrupt."""
    global _graceful_depth
    _graceful_depth += 1
    try:
        yield
    finally:
        _graceful_depth -= 1
        if _graceful_depth == 0:
            _stop.clear()


def _handle(signum: int, frame: Any) -> None:
    if _graceful_depth and not _stop.is_set():
        _stop.set()
        logger.warning("%s received: saving a resumable state at the next step (send it again to abort now)",
                       signal.Signals(signum).name)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def signal_handlers() -> Iterator[None]:
    """SIGINT and SIGTERM handled as above for the duration of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
