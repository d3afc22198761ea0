r"""The KL guard: a step whose *measured* KL overshoots the trust region is shrunk or undone.

The trust-region clip bounds K-FAC's model of the step's KL, ``½ ΔᵀF̂Δ ≤ c/2``
(:mod:`rl_kfac.trust_region`). The model can be wrong by orders of magnitude — a small damping
λ, a stale eigenbasis, a policy close to deterministic — and one such step can end a run (a
CartPole policy made deterministic by one update of measured KL 1.82 under ``c = 0.01``). The
guard checks the ground truth: after the step it measures KL(π_old ‖ π_new) on the batch with a
function the caller gives, and with the bound ``b = kl_guard · c``

- ``kl ≤ b``: the step stands;
- else the whole step is scaled back, parameters and momentum buffers alike, to
  ``old + s (new − old)``, and measured again. A step's KL grows about as the square of its
  length, so ``s ← s · min(½, 0.9 √(b / kl))`` aims just under the bound and at least halves
  the step
  (TRPO's backtracking line search on the KL constraint, Schulman et al. 2015, App. C);
- after ``max_backtracks`` shrinks still above the bound: the step is undone, and parameters and
  momentum are exactly what they were before it.

Either way the step counts as *rejected* (``kfac/rejected_steps``): the model under-estimated the
KL, which more damping corrects, so the damping controllers raise λ after an update with a
rejected step (:meth:`rl_kfac.damping.KLDampingController.update`).

Cost: a copy of the parameters and momentum buffers before each guarded step, one forward pass
over the batch for each measurement (one when the step stands), and a host read of the KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

AIM = 0.9  # of the square-root rule's shrink: under the bound when KL grows a little faster
KLMeasure = Callable[[], "float | Tensor"]
"""Returns KL(π_old ‖ π_new) of the batch at the parameters as they are now (π_old: the policy
before the step, held by the caller; π_new: a forward pass now). Runs under ``torch.no_grad()``."""


@dataclass(frozen=True)
class GuardResult:
    """What the guard did to one step.

    Attributes:
        proposed_kl: the measured KL of the step as K-FAC proposed it.
        kl: the measured KL of the step as kept (0 when undone).
        kept: the fraction ``s`` of the step kept: 1 — it stands, 0 — undone.
    """

    proposed_kl: float
    kl: float
    kept: float

    @property
    def rejected(self) -> bool:
        return self.kept < 1.0


class Snapshot:
    """Parameters and momentum buffers before a step, to scale the step back or undo it.

    ``buffers[i]`` is ``None`` where parameter ``i`` had no momentum buffer yet: undoing the
    step zeroes the one the step made, which is the same momentum as none.
    """

    def __init__(self, params: list[Tensor], buffers: list[Tensor | None]) -> None:
        self.params = params
        self.old = [p.detach().clone() for p in params]
        self.old_buffers = [None if b is None else b.clone() for b in buffers]
        self._delta: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None

    def scale_back(self, kept: float, buffers: list[Tensor | None]) -> None:
        """Parameters and buffers to ``old + kept · (new − old)``, ``new`` the full step's."""
        if self._delta is None:  # the first shrink: remember the full step
            bufs = [b for b in buffers if b is not None]
            olds = [self._old_buffer(i, b) for i, b in enumerate(buffers) if b is not None]
            self._delta = (
                list(torch._foreach_sub(self.params, self.old)),
                list(torch._foreach_sub(bufs, olds)) if bufs else [],
                olds,
            )
        step, buf_step, buf_old = self._delta
        torch._foreach_copy_(self.params, self.old)
        torch._foreach_add_(self.params, step, alpha=kept)
        bufs = [b for b in buffers if b is not None]
        if bufs:
            torch._foreach_copy_(bufs, buf_old)
            torch._foreach_add_(bufs, buf_step, alpha=kept)

    def restore(self, buffers: list[Tensor | None]) -> None:
        """Parameters and buffers exactly as before the step."""
        torch._foreach_copy_(self.params, self.old)
        for i, b in enumerate(buffers):
            if b is not None:
                b.copy_(self._old_buffer(i, b))

    def _old_buffer(self, i: int, now: Tensor) -> Tensor:
        old = self.old_buffers[i]
        return torch.zeros_like(now) if old is None else old


def backtrack(
    snapshot: Snapshot,
    buffers: Callable[[], list[Tensor | None]],
    measure: Callable[[], float],
    bound: float,
    max_backtracks: int,
) -> GuardResult:
    """Check the step just taken against ``bound``; shrink or undo it (see the module)."""
    proposed = kl = measure()
    kept = 1.0
    shrinks = 0
    while not kl <= bound:  # nan too
        if shrinks == max_backtracks:
            snapshot.restore(buffers())
            return GuardResult(proposed, 0.0, 0.0)
        aim = AIM * math.sqrt(bound / kl) if math.isfinite(kl) and kl > 0 else 0.5
        kept *= min(0.5, aim)
        snapshot.scale_back(kept, buffers())
        kl = measure()
        shrinks += 1
    return GuardResult(proposed, kl, kept)
