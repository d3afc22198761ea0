"""Tikhonov damping of a Kronecker-factored block in the factors' eigenbasis.

With ``A = Q_A diag(e_A) Q_Aᵀ`` and ``G = Q_G diag(e_G) Q_Gᵀ``, the preconditioned gradient of
``[W | b]`` (matrix ``M``) is ``Q_G [(Q_Gᵀ M Q_A) / D] Q_Aᵀ`` where the denominator ``D`` is

- ``"exact"``: ``D = e_G e_Aᵀ + λ``, i.e. ``(A ⊗ G + λ I)⁻¹`` exactly (Martens & Grosse 2015, §6.3
  call this the "exact" damped inverse that factored damping approximates);
- ``"pi"``: ``D = (e_G + √λ/π)(e_A + π√λ)ᵀ``, i.e. ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` with
  ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (factored Tikhonov, Martens & Grosse 2015, §6.3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

DampingMode = Literal["exact", "pi"]
DAMPING_MODES: tuple[DampingMode, ...] = ("exact", "pi")


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
        return torch.addcmul(e_g.new_tensor(damping), e_g.unsqueeze(2), e_a.unsqueeze(1))
    root = damping**0.5
    pi = pi.unsqueeze(1)
    return (e_g + root / pi).unsqueeze(2) * (e_a + root * pi).unsqueeze(1)
