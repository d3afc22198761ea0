"""What the last K-FAC step did, as one typed record, and its scalars under fixed log tags."""

from __future__ import annotations

import math
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
        step_kl: the measured KL of the last step as kept, when the KL guard checked it
            (``nan``: not checked).
        step_kept: the fraction of the last step the KL guard kept (1: all, 0: undone).
        steps, statistics_updates, inverse_updates, skipped_steps, skipped_statistics,
        eig_failures, rejected_steps: counters since the optimizer was made (saved in its
        ``state_dict``); ``rejected_steps``: steps the KL guard shrank or undid.
    """

    step_scale: float = 1.0
    quadratic: float = 0.0
    damping: float = 0.0
    step_kl: float = math.nan
    step_kept: float = 1.0
    steps: int = 0
    statistics_updates: int = 0
    inverse_updates: int = 0
    skipped_steps: int = 0
    skipped_statistics: int = 0
    eig_failures: int = 0
    rejected_steps: int = 0

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
            "kfac/rejected_steps": float(self.rejected_steps),
            "kfac/step_kept": self.step_kept,
        }


def log_diagnostics(diagnostics: Diagnostics, record: Callable[[str, float], Any]) -> None:
    """Send the scalars to a logger: ``SummaryWriter.add_scalar`` (partial) or SB3's
    ``logger.record``."""
    for tag, value in diagnostics.scalars().items():
        record(tag, value)
