"""SIGTERM/SIGINT as a flag that training loops check after each step (checkpoint, then a clean exit)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag that training loops check after each step, so that they can write a
    checkpoint and exit cleanly; a second SIGINT stops at once. Handlers are installed in the main thread only.

    Usage: ``with StopSignals() as stop: ... if stop.signum is not None: save, then raise``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
