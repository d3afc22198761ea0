"""Adapting the trust-region radius ``c`` (``KFAC(kl_clip=c)``) to the KL an update really had.

The clip bounds the step's KL *under K-FAC's model*: ``½ ΔᵀF̂Δ ≤ c/2``. The true KL
``½ ΔᵀFΔ`` can be far larger, because the step ``F̂⁻¹g`` goes furthest exactly where ``F̂``
underestimates ``F``: the Kronecker and block-diagonal approximations, and running-average
factors that lag a policy whose output layer grows from its small initialisation. Measured with
the exact Fisher on ACKTR's Hopper-v5 config at decay 0.99 (``scripts/kl_model_check.py``,
first 100 updates, policy parameters only): model and truth agree at the first update, then
part; the step's true quadratic KL was a median 93× the model's, and the measured KL agreed with
the true quadratic to 2 %. So the measured KL, not ``c``, says how far an update went;
this controller moves ``c`` until the measured KL sits near a target.

The rule is the one OpenAI baselines' continuous-control ACKTR (``acktr_cont``, Wu et al. 2017)
applies to its step size: outside the band ``[target/2, 2·target]`` the radius is multiplied or
divided by ``factor`` (1.5 there). Here it acts on ``c`` rather than on the learning rate because
while the clip binds the step length is ``sqrt(c/q)`` whatever the learning rate is.

``c`` never exceeds the radius it was configured with (``clip_max``): the controller only
tightens the trust region. Two reasons: ``q`` also holds the value function's Gauss-Newton term,
which dominates it while the critic is far from its targets, so that the policy's KL is small
however large ``c`` is; and ``c`` only grows after a step the clip shortened (``ν < 1``), since
otherwise a larger radius would not lengthen the step. Without the ceiling, ``c`` winds up in
that phase and the first policy-dominated steps overshoot (PPO-KFAC on Pendulum: KL 28 and 42).
"""

from __future__ import annotations

import math


class KLClipController:
    """Moves the trust-region radius ``c`` toward a target KL(π_old ‖ π_new) per update.

    ``c ← c / factor`` if ``kl > 2·target``; ``c ← c · factor`` if ``kl < target/2`` and the
    step was clipped; else unchanged; always within ``[clip_min, clip_max]``. ``clip_max``: the
    configured radius (the optimizer's ``kl_clip`` when it is made).
    """

    def __init__(
        self,
        target_kl: float,
        clip_max: float,
        factor: float = 1.5,
        clip_min: float = 1e-6,
    ) -> None:
        if not 0 < target_kl < math.inf:
            raise ValueError(f"target_kl must be > 0 and finite, got {target_kl}")
        if not 1 < factor < math.inf:
            raise ValueError(f"factor must be > 1 and finite, got {factor}")
        if not 0 < clip_min <= clip_max < math.inf:  # nan fails too
            raise ValueError(f"need 0 < clip_min <= clip_max, got {clip_min}, {clip_max}")
        self.target_kl, self.factor = target_kl, factor
        self.clip_min, self.clip_max = clip_min, clip_max

    def update(self, kl_clip: float, kl: float, clipped: bool) -> float:
        """The new radius after an update of measured ``kl`` taken with radius ``kl_clip``;
        ``clipped``: whether the trust region shortened that update's step (``ν < 1``). A
        non-finite or negative ``kl`` (a skipped step) keeps the radius."""
        if not 0 <= kl < math.inf:
            return kl_clip
        if kl > 2 * self.target_kl:
            kl_clip /= self.factor
        elif kl < self.target_kl / 2 and clipped:
            kl_clip *= self.factor
        return min(max(kl_clip, self.clip_min), self.clip_max)

    def __repr__(self) -> str:
        return (
            f"KLClipController(target_kl={self.target_kl}, factor={self.factor}, "
            f"bounds=({self.clip_min}, {self.clip_max}))"
        )
