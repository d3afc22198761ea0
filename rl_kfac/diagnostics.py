"""What the last K-FAC step did, as one typed record, and its scalars under fixed log tags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Diagnostics:
    """The last ``KFAC.step()`` and the optimizer's counters so far.

    Attributes:
        step_scale: the trust-region factor ν of the last step (``nan``: the step was skipped).
        quadratic: ``Σ_p ⟨v_p, g_p⟩`` of the last step (``v = F̂⁻¹ g``; before lr and ν).
        damping: λ of the first parameter group now (a damping controller may have moved it
            since the last step: the value the next step will use).
        steps, statistics_updates, inverse_updates, skipped_steps, skipped_statistics,
        eig_failures: counters since the optimizer was made (saved in its ``state_dict``).
    """

    step_scale: float = 1.0
    quadratic: float = 0.0
    damping: float = 0.0
    steps: int = 0
    statistics_updates: int = 0
    inverse_updates: int = 0
    skipped_steps: int = 0
    skipped_statistics: int = 0
    eig_failures: int = 0

    @property
    def clipped(self) -> bool:
        """Whether the trust region shortened the last step (ν < 1; a skipped step was not)."""
        return self.step_scale < 1.0

    def scalars(self) -> dict[str, float]:
        """The logged scalars by tag (TensorBoard and SB3's logger use the same tags)."""
        return {
            "kfac/step_scale": self.step_scale,
            "kfac/damping": self.damping,
            "kfac/quadratic": self.quadratic,
            "kfac/skipped_steps": float(self.skipped_steps),
        }


def log_diagnostics(diagnostics: Diagnostics, record: Callable[[str, float], Any]) -> None:
    """Send the scalars to a logger: ``SummaryWriter.add_scalar`` (partial) or SB3's
    ``logger.record``."""
    for tag, value in diagnostics.scalars().items():
        record(tag, value)
