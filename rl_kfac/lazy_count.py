"""A counter that may be incremented on an accelerator without waiting for it."""

from __future__ import annotations

from torch import Tensor


class LazyCount:
    """An ``int`` kept on the host, plus increments still on the device.

    ``add_flag`` adds a 0-dim bool tensor without reading it; :meth:`settle` reads the
    device's part (one host round trip) when the value is wanted, e.g. at logging time.
    """

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self._on_device: Tensor | None = None

    def add_flag(self, flag: Tensor) -> None:
        """Count ``flag`` (a 0-dim bool tensor) as 1 where true, without reading it."""
        n = flag.long()
        self._on_device = n if self._on_device is None else self._on_device + n

    @property
    def pending(self) -> bool:
        """Whether device increments are not read yet."""
        return self._on_device is not None

    def settle(self) -> int:
        """Fold the device's increments into :attr:`value`; how many there were."""
        if self._on_device is None:
            return 0
        n, self._on_device = int(self._on_device), None
        self.value += n
        return n

    def __repr__(self) -> str:
        return f"LazyCount(value={self.value}, pending={self.pending})"
