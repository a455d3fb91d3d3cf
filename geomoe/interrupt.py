"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be, and drops it (printing "Exception ignored")
when that is a finaliser or a callback whose errors it ignores; with reader and writer threads about, that happens.
The CLI records the signal here as well, and long loops call ``check()`` at safe points, so an interrupt that was
dropped is raised again there.
"""

from __future__ import annotations

import signal
import threading

_pending = threading.Event()


def _on_sigint(signum, frame) -> None:
    _pending.set()
    raise KeyboardInterrupt


def install() -> None:
    """Record Ctrl-C (main thread only; the CLI calls this once)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if its first KeyboardInterrupt was dropped."""
    if _pending.is_set():
        raise KeyboardInterrupt
