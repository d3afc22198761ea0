"""Tikhonov damping of a Kronecker-factored block in the factors' eigenbasis.

With ``A = Q_A diag(e_A) Q_Aᵀ`` and ``G = Q_G diag(e_G) Q_Gᵀ``, the preconditioned gradient of
``[W | b]`` (matrix ``M``) is ``Q_G [(Q_Gᵀ M Q_A) / D] Q_Aᵀ`` where the denominator ``D`` is

- ``"exact"``: ``D = e_G e_Aᵀ + λ``, i.e. ``(A ⊗ G + λ I)⁻¹`` exactly (Martens & Grosse 2015, §6.3
  call this the "exact" damped inverse that factored damping approximates);
- ``"pi"``: ``D = (e_G + √λ/π)(e_A + π√λ)ᵀ``, i.e. ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` with
  ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (factored Tikhonov, Martens & Grosse 2015, §6.3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

DampingMode = Literal["exact", "pi"]
DAMPING_MODES: tuple[DampingMode, ...] = ("exact", "pi")
TargetSchedule = Literal["lr_squared", "constant"]
TARGET_SCHEDULES: tuple[TargetSchedule, ...] = ("lr_squared", "constant")


def pi_factor(a: Tensor, g: Tensor) -> Tensor:
    """``π = sqrt((tr A/dim A) / (tr G/dim G))``; 1 when either factor has no mass."""
    mean_a = torch.diagonal(a).mean()
    mean_g = torch.diagonal(g).mean()
    tiny = torch.finfo(a.dtype).tiny
    ok = (mean_a > tiny) & (mean_g > tiny)
    ratio = torch.where(ok, mean_a / torch.where(ok, mean_g, 1.0), 1.0)
    return ratio.sqrt()


def denominators(e_g: Tensor, e_a: Tensor, pi: Tensor, damping: float, mode: DampingMode) -> Tensor:
    """Batched ``D`` for eigenvalues ``e_g (L, dg)``, ``e_a (L, da)`` and ``pi (L,)``."""
    if mode == "exact":
        return torch.addcmul(e_g.new_full((), damping), e_g.unsqueeze(2), e_a.unsqueeze(1))
    root = damping**0.5
    pi = pi.unsqueeze(1)
    return (e_g + root / pi).unsqueeze(2) * (e_a + root * pi).unsqueeze(1)


class KLDampingController:
    """Moves the damping λ multiplicatively toward a target KL(π_old ‖ π_new) per update.

    ``λ ← clip(λ · clip((kl / target)^rate, 1/max_factor, max_factor), λ_min, λ_max)``, with
    ``target = target_kl`` throughout (``target_schedule="constant"``, the default) or
    ``target_kl · (lr / lr₀)²`` under a learning-rate schedule (``"lr_squared"``, see
    :meth:`update`): an update that overshoots the target raises λ (shorter, more
    curvature-dominated steps), a timid one lowers it. The response is monotone in the measured
    KL and bounded per update and overall.
    Reference RL implementations adapt the step size from the KL instead (e.g. PPO's adaptive KL
    penalty, Schulman et al. 2017); here the step size stays the trust region's job.

    With ``hold_when_clipped`` an update whose step the trust region shortened (ν < 1) and whose
    KL fell short of the target keeps λ: the shortfall then comes from the clip, not from the
    damping, and lowering λ for it lets the undamped model overshoot once the clip stops binding
    (a critic-dominated clip drove λ to its floor and a separate-core recurrent policy collapsed).

    An update with a step the KL guard rejected (:mod:`rl_kfac.kl_guard`) raises λ by
    ``max_factor`` whatever its kept KL: the curvature model under-estimated the step's KL, and
    more damping is what shortens the model's steps where it is wrong.
    """

    def __init__(
        self,
        target_kl: float = 0.01,
        rate: float = 0.5,
        max_factor: float = 2.0,
        damping_min: float = 1e-4,
        damping_max: float = 1.0,
        target_schedule: TargetSchedule = "constant",
        hold_when_clipped: bool = False,
    ) -> None:
        if target_schedule not in TARGET_SCHEDULES:
            raise ValueError(
                f"target_schedule must be one of {TARGET_SCHEDULES}, got {target_schedule!r}"
            )
        if target_kl <= 0 or rate <= 0 or max_factor <= 1:
            raise ValueError("need target_kl > 0, rate > 0 and max_factor > 1")
        if not 0 < damping_min <= damping_max:
            raise ValueError(
                f"need 0 < damping_min <= damping_max, got {damping_min}, {damping_max}"
            )
        self.target_kl, self.rate, self.max_factor = target_kl, rate, max_factor
        self.damping_min, self.damping_max = damping_min, damping_max
        self.target_schedule = target_schedule
        self.hold_when_clipped = hold_when_clipped

    def update(
        self,
        damping: float,
        kl: float,
        lr_fraction: float = 1.0,
        clipped: bool = False,
        rejected: bool = False,
    ) -> float:
        """The new λ after an update of measured ``kl`` taken at ``lr_fraction`` of the initial
        learning rate. With ``"lr_squared"`` the target is ``target_kl · lr_fraction²``, since an
        update's KL scales with the square of its step. A fixed target under a decaying learning
        rate would lower λ to make up for the smaller steps, undoing the schedule; once λ is small
        the damped quadratic model, and with it the trust region, can badly underestimate the true
        KL (PPO-KFAC on CartPole: an update of KL 0.85 under kl_clip 0.01, then a collapse). With
        ``"constant"`` (the default) the target stays ``target_kl``: λ then falls as the learning
        rate does, which the configs tuned with it need late in training (PPO-KFAC on LunarLander
        reached 200 on 3 of 5 tuning seeds with the scaled target, 5 of 5 with the constant one).
        ``clipped``: whether the trust region shortened the update's step; ``rejected``: whether
        the KL guard shrank or undid one of its steps (see the class)."""
        if rejected:
            return min(max(damping * self.max_factor, self.damping_min), self.damping_max)
        if math.isnan(kl) or kl < 0 or not lr_fraction > 0:  # keep λ
            return damping
        if self.target_schedule == "constant":
            lr_fraction = 1.0
        target = self.target_kl * min(lr_fraction, 1.0) ** 2
        if self.hold_when_clipped and clipped and kl < target:
            return damping
        factor = (max(kl, 1e-12) / target) ** self.rate
        factor = min(max(factor, 1.0 / self.max_factor), self.max_factor)
        return min(max(damping * factor, self.damping_min), self.damping_max)

    def __repr__(self) -> str:
        return (
            f"KLDampingController(target_kl={self.target_kl}, rate={self.rate}, "
            f"max_factor={self.max_factor}, bounds=({self.damping_min}, {self.damping_max}), "
            f"target_schedule={self.target_schedule!r}, "
            f"hold_when_clipped={self.hold_when_clipped})"
        )


class LevenbergMarquardt:
    """Martens' (2010) rule from the reduction ratio ρ = actual / predicted loss change.

    With ``v = (F̂ + λI)⁻¹ g`` and the step ``δ = -α v`` (α = lr·ν, momentum 0), the damped
    quadratic model predicts ``M(δ) = gᵀδ + ½ δᵀ(F̂ + λI)δ = q (α²/2 − α)`` with ``q = gᵀv``.
    ρ < 1/4: the model was too optimistic, λ ← λ·ω; ρ > 3/4: λ ← λ/ω.
    """

    def __init__(
        self, omega: float = 1.5, damping_min: float = 1e-4, damping_max: float = 1.0
    ) -> None:
        if omega <= 1 or not 0 < damping_min <= damping_max:
            raise ValueError("need omega > 1 and 0 < damping_min <= damping_max")
        self.omega, self.damping_min, self.damping_max = omega, damping_min, damping_max

    def __repr__(self) -> str:
        return (
            f"LevenbergMarquardt(omega={self.omega}, "
            f"bounds=({self.damping_min}, {self.damping_max}))"
        )

    @staticmethod
    def predicted_change(quadratic: float, step: float) -> float:
        return quadratic * (step * step / 2 - step)

    def update(self, damping: float, actual: float, predicted: float) -> float:
        if predicted >= 0 or math.isnan(actual):
            return damping
        rho = actual / predicted
        if rho < 0.25:
            damping *= self.omega
        elif rho > 0.75:
            damping /= self.omega
        return min(max(damping, self.damping_min), self.damping_max)
