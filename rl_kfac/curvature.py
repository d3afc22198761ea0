"""Eigendecompositions and batched preconditioning of many blocks at once.

Small networks spend their K-FAC time in per-layer Python and kernel-launch overhead, not in
arithmetic. Blocks are therefore grouped into *buckets*: the gradients ``[W | b]`` of all blocks in
a bucket live zero-padded in one ``(L, dim_g, dim_a)`` tensor and are preconditioned by four
batched matmuls. Padded rows/columns carry identity eigenvectors and zero gradient, so they
contribute exact zeros to the real entries. Buckets are chosen to trade padding flops against the
per-call overhead (``plan_buckets``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl_kfac.blocks import Block
from rl_kfac.damping import DampingMode, denominators

# Rough cost of one extra batched kernel call, in flops, on a small CPU; used only to decide how
# much zero padding is worth one fewer bucket.
_CALL_OVERHEAD_FLOPS = 2e6


def symmetric_eig(mat: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor.

    Tries the factor's dtype, then float64. Returns ``None`` when both fail (LAPACK/cuSOLVER
    error or non-finite output), so the caller can keep its last good basis.
    """
    for dtype in dict.fromkeys((mat.dtype, torch.float64)):
        try:
            evals, evecs = torch.linalg.eigh(mat.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        if bool(torch.isfinite(evals).all() & torch.isfinite(evecs).all()):
            return evals.clamp_min(0.0).to(mat.dtype), evecs.to(mat.dtype)
    return None


def _bucket_cost(dims: list[tuple[int, int]]) -> float:
    dg = max(d[0] for d in dims)
    da = max(d[1] for d in dims)
    return _CALL_OVERHEAD_FLOPS + 2.0 * len(dims) * dg * da * (dg + da)


def plan_buckets(blocks: list[Block]) -> list[list[Block]]:
    """Greedily merge blocks into padded buckets while merging lowers the estimated cost."""
    buckets = [[b] for b in blocks]
    while len(buckets) > 1:
        best: tuple[float, int, int] | None = None
        for i in range(len(buckets)):
            for j in range(i + 1, len(buckets)):
                dims_i = [(b.dim_g, b.dim_a) for b in buckets[i]]
                dims_j = [(b.dim_g, b.dim_a) for b in buckets[j]]
                gain = _bucket_cost(dims_i) + _bucket_cost(dims_j) - _bucket_cost(dims_i + dims_j)
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j)
        if best is None:
            break
        _, i, j = best
        buckets[i] = buckets[i] + buckets.pop(j)
    return buckets


class Bucket:
    """Padded eigenbases and gradient/update buffers of blocks that are preconditioned together."""

    def __init__(self, blocks: list[Block], dtype: torch.dtype, device: torch.device) -> None:
        self.blocks = blocks
        n = len(blocks)
        self.dim_g = max(b.dim_g for b in blocks)
        self.dim_a = max(b.dim_a for b in blocks)
        eye_a = torch.eye(self.dim_a, dtype=dtype, device=device)
        eye_g = torch.eye(self.dim_g, dtype=dtype, device=device)
        self.q_a, self.q_g = eye_a.repeat(n, 1, 1), eye_g.repeat(n, 1, 1)
        self.e_a = eye_a.new_ones(n, self.dim_a)
        self.e_g = eye_g.new_ones(n, self.dim_g)
        self.pi = eye_a.new_ones(n)
        self.grad = eye_a.new_zeros(n, self.dim_g, self.dim_a)
        self.update = torch.zeros_like(self.grad)
        self._tmp = torch.zeros_like(self.grad)
        self.params = [p for b in blocks for p in b.params]
        self.grad_views = [v for i, b in enumerate(blocks) for v in b.matrix_views(self.grad[i])]
        self.update_views = [
            v for i, b in enumerate(blocks) for v in b.matrix_views(self.update[i])
        ]
        self._den: Tensor | None = None
        self._den_key: tuple[float, str] | None = None

    def set_eigen(
        self, i: int, eig_a: tuple[Tensor, Tensor], eig_g: tuple[Tensor, Tensor], pi: Tensor
    ) -> None:
        """Write block ``i``'s eigenpairs into the padded stacks (padding stays identity)."""
        (e_a, q_a), (e_g, q_g) = eig_a, eig_g
        da, dg = e_a.shape[0], e_g.shape[0]
        self.q_a[i, :da, :da].copy_(q_a)
        self.e_a[i, :da].copy_(e_a)
        self.q_g[i, :dg, :dg].copy_(q_g)
        self.e_g[i, :dg].copy_(e_g)
        self.pi[i].copy_(pi)
        self._den_key = None

    def precondition(self, damping: float, mode: DampingMode) -> Tensor:
        """``update = Q_G [(Q_Gᵀ grad Q_A) / D] Q_Aᵀ`` for every block at once."""
        key = (damping, mode)
        if self._den is None or self._den_key != key:
            self._den = denominators(self.e_g, self.e_a, self.pi, damping, mode)
            self._den_key = key
        tmp = torch.bmm(self.q_g.mT, self.grad, out=self._tmp)
        rotated = torch.bmm(tmp, self.q_a).div_(self._den)
        torch.bmm(self.q_g, rotated, out=self._tmp)
        return torch.bmm(self._tmp, self.q_a.mT, out=self.update)

    def __repr__(self) -> str:
        return f"Bucket(n={len(self.blocks)}, G={self.dim_g}, A={self.dim_a})"
