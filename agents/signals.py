"""Stop a training loop cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, ``timeout``,
``docker stop``): the update in progress finishes, then the loop saves and stops."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the loop after it saved a checkpoint on a stop signal."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM only set :attr:`received`; a second SIGINT interrupts
    at once (``KeyboardInterrupt``). Outside the main thread signals cannot be caught: then
    this does nothing and Ctrl-C interrupts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __repr__(self) -> str:
        return f"StopSignals(received={self.received})"
