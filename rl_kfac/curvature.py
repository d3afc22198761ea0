"""Third stage: eigendecompositions of the running factors, and batched preconditioning.

:class:`Curvature` decomposes every block's running A and G (``A = Q_A diag(e_A) Q_Aᵀ``; the
eigenvalues, eigenvectors and the π of factored damping are kept in the optimizer's
per-parameter state as ``eA, QA, eG, QG, pi``) and lays the blocks of each parameter group out
in buckets that precondition with them (damping: :mod:`rl_kfac.damping`).

Small networks spend their K-FAC time in per-layer Python and kernel-launch overhead, not in
arithmetic. Blocks are therefore grouped into *buckets*: the gradients ``[W | b]`` of all blocks in
a bucket live zero-padded in one ``(L, dim_g, dim_a)`` tensor and are preconditioned by four
batched matmuls. Padded rows/columns carry identity eigenvectors and zero gradient, so they
contribute exact zeros to the real entries. Buckets are chosen to trade padding flops against the
per-call overhead (``plan_buckets``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rl_kfac.blocks import Block
from rl_kfac.damping import DampingMode, denominators, pi_factor
from rl_kfac.statistics import FactorStore, StateOf

if TYPE_CHECKING:
    from rl_kfac.distributed import Communicator

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


class GroupLayout:
    """One parameter group: the buckets of its preconditioned blocks and its plain parameters."""

    def __init__(self, buckets: list[Bucket], plain: list[Tensor]) -> None:
        self.buckets, self.plain = buckets, plain
        self.params = [p for b in buckets for p in b.params] + plain
        self._momentum: list[Tensor] | None = None

    def momentum_buffers(self, params: list[Tensor], state_of: StateOf) -> list[Tensor]:
        """The momentum buffers of ``params`` (created at zero), cached when ``params`` is all."""
        if self._momentum is not None and len(params) == len(self.params):
            return self._momentum
        bufs = []
        for p in params:
            state = state_of(p)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        if len(params) == len(self.params):
            self._momentum = bufs
        return bufs

    def __repr__(self) -> str:
        return f"GroupLayout(buckets={self.buckets}, plain={len(self.plain)})"


class Curvature:
    """Eigenbases of every block's running factors, and the layout that preconditions with them.

    Args:
        factors: the running factors it decomposes; the eigenbases go in the same optimizer
            state (keys ``eA, QA, eG, QG, pi``), in the factors' dtype.
        communicator: shares the decompositions out across ranks (``None``: one process).
    """

    def __init__(self, factors: FactorStore, communicator: Communicator | None = None) -> None:
        self._factors = factors
        self._state_of = factors.state_of
        self.dtype = factors.dtype
        self._comm = communicator if communicator and communicator.world_size > 1 else None
        self._layout: list[GroupLayout] | None = None
        self.updates = 0  # rounds of eigendecompositions
        self.failures = 0  # blocks whose decomposition failed (their last basis kept)

    def decompose(self, blocks: list[Block]) -> list[str]:
        """Eigendecompose the factors of ``blocks`` that have some; returns the failed blocks."""
        blocks = [b for b in blocks if self._factors.has(b)]
        factors = [f for b in blocks for f in self._factors.factors(b)]
        if self._comm is None:
            results = [symmetric_eig(f) for f in factors]
        else:
            from rl_kfac.distributed import shared_eigendecompositions

            results = shared_eigendecompositions(self._comm, factors, symmetric_eig)
        failed = []
        for i, block in enumerate(blocks):
            state = self._state_of(block.weight)
            eig_a, eig_g = results[2 * i], results[2 * i + 1]
            if eig_a is None or eig_g is None:
                self.failures += 1
                failed.append(block.name)
                continue
            (state["eA"], state["QA"]), (state["eG"], state["QG"]) = eig_a, eig_g
            state["pi"] = pi_factor(*self._factors.factors(block))
        self.updates += 1
        if self._factors.take_new_blocks():  # a layer got its first factors: the buckets change
            self._layout = None
        elif self._layout is not None:
            for lay in self._layout:
                for bucket in lay.buckets:
                    self._load(bucket)
        return failed

    def ready(self, block: Block) -> bool:
        """Whether ``block`` has an eigenbasis (else its parameters get the plain gradient)."""
        return "QA" in self._state_of(block.weight)

    def invalidate(self) -> None:
        """Rebuild the layout before the next step (layers were found, or state was loaded)."""
        self._layout = None

    def layout(self, param_groups: list[dict[str, Any]], blocks: list[Block]) -> list[GroupLayout]:
        """Per parameter group: buckets of the blocks with an eigenbasis, and the rest."""
        if self._layout is None:
            self._layout = self._build(param_groups, blocks)
        return self._layout

    def _build(self, param_groups: list[dict[str, Any]], blocks: list[Block]) -> list[GroupLayout]:
        group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
        ready: list[list[Block]] = [[] for _ in param_groups]
        for block in blocks:
            if not self.ready(block):
                continue
            groups = {group_of.get(id(p), -1) for p in block.params}
            if len(groups) != 1 or -1 in groups:
                raise ValueError(f"{block.name}: weight and bias must be in the same param group")
            ready[groups.pop()].append(block)
        layout = []
        for group, members in zip(param_groups, ready):
            owned = {id(p) for b in members for p in b.params}
            buckets = []
            for bucket_blocks in plan_buckets(members):
                bucket = Bucket(bucket_blocks, self.dtype, bucket_blocks[0].weight.device)
                self._load(bucket)
                buckets.append(bucket)
            plain = [p for p in group["params"] if id(p) not in owned]
            layout.append(GroupLayout(buckets, plain))
        return layout

    def _load(self, bucket: Bucket) -> None:
        for i, b in enumerate(bucket.blocks):
            s = self._state_of(b.weight)
            bucket.set_eigen(i, (s["eA"], s["QA"]), (s["eG"], s["QG"]), s["pi"])

    def load_counters(self, updates: int, failures: int) -> None:
        self.updates, self.failures = updates, failures

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_layout"] = None  # buffers that view parameters: rebuilt on the next step
        return state

    def __repr__(self) -> str:
        return f"Curvature(dtype={self.dtype}, updates={self.updates}, failures={self.failures})"
