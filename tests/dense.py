"""Independent dense math for the tests: no code from rl_kfac is used here."""

from __future__ import annotations

import torch
from torch import Tensor


def vec(m: Tensor) -> Tensor:
    """Column-major vectorisation, the convention under which (A ⊗ G) vec(M) = vec(G M A)."""
    return m.T.reshape(-1)


def unvec(v: Tensor, rows: int) -> Tensor:
    return v.reshape(-1, rows).T


def layer_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    w = weight.reshape(weight.shape[0], -1)
    return w if bias is None else torch.cat([w, bias[:, None]], dim=1)


def with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def factors_linear(a: Tensor, g: Tensor, bias: bool = True) -> tuple[Tensor, Tensor]:
    """A = (1/N) Σ ā āᵀ, G = (1/N) Σ (N g)(N g)ᵀ from per-sample rows."""
    n = a.shape[0]
    ab = with_ones(a) if bias else a
    return ab.T @ ab / n, (n * g).T @ (n * g) / n


def patches_by_loop(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """Patches (N, R, C·kh·kw) by explicit slicing of the zero-padded input, no unfold."""
    ph, pw = conv.padding  # type: ignore[misc]
    sh, sw = conv.stride
    dh, dw = conv.dilation
    kh, kw = conv.kernel_size
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = xp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def damped_solve_exact(a: Tensor, g: Tensor, m: Tensor, damping: float) -> Tensor:
    """(A ⊗ G + λI)⁻¹ vec(M), returned as a matrix."""
    f = torch.kron(a, g)
    v = torch.linalg.solve(f + damping * torch.eye(f.shape[0], dtype=f.dtype), vec(m))
    return unvec(v, m.shape[0])


def damped_solve_pi(a: Tensor, g: Tensor, m: Tensor, damping: float) -> Tensor:
    """((A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹) vec(M)."""
    pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
    r = damping**0.5
    ia = torch.linalg.inv(a + pi * r * torch.eye(a.shape[0], dtype=a.dtype))
    ig = torch.linalg.inv(g + r / pi * torch.eye(g.shape[0], dtype=g.dtype))
    return unvec(torch.kron(ia, ig) @ vec(m), m.shape[0])
