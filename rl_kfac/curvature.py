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

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

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


InverseMode = Literal["sync", "background"]
INVERSE_MODES: tuple[InverseMode, ...] = ("sync", "background")
Eigen = tuple[Tensor, Tensor]
Decomposed = tuple[list[Block], list["Eigen | None"], list[Tensor]]  # blocks, A/G eigs, π


class Curvature:
    """Eigenbases of every block's running factors, and the layout that preconditions with them.

    Args:
        factors: the running factors it decomposes; the eigenbases go in the same optimizer
            state (keys ``eA, QA, eG, QG, pi``), in the factors' dtype.
        communicator: shares the decompositions out across ranks (``None``: one process).
        mode: ``"sync"`` — due decompositions run at once, in the step that is due;
            ``"background"`` — they start from a copy of that step's factors in a worker thread
            (a side stream on CUDA) while training goes on, and are swapped in at the start of
            the next step (which waits for them if they are not done): the eigenbases lag the
            factors by one step, deterministically, as in the ACKTR code's asynchronous mode
            but reproducible. A layer's first decomposition always runs at once.
    """

    def __init__(
        self,
        factors: FactorStore,
        communicator: Communicator | None = None,
        mode: InverseMode = "sync",
    ) -> None:
        self._factors = factors
        self._state_of = factors.state_of
        self.dtype = factors.dtype
        self._comm = communicator if communicator and communicator.world_size > 1 else None
        if mode == "background" and self._comm is not None:
            raise ValueError("inverse_mode='background' runs in one process (no communicator)")
        self.mode: InverseMode = mode
        self._layout: list[GroupLayout] | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future[Decomposed] | None = None
        self.updates = 0  # rounds of eigendecompositions
        self.failures = 0  # blocks whose decomposition failed (their last basis kept)

    def refresh(self, blocks: list[Block], due: bool) -> list[str]:
        """Swap in finished background results; decompose now when a layer is new (or ``due``
        in sync mode), or start in the background when ``due``. Returns the failed layers."""
        failed = self.finish()
        if self._factors.new_blocks or (due and self.mode == "sync"):
            failed += self._apply(*self._decompose_now(blocks))
        elif due:
            self._start(blocks)
        return failed

    def finish(self) -> list[str]:
        """Swap in the background decomposition in flight, if any; returns its failed layers."""
        if self._pending is None:
            return []
        pending, self._pending = self._pending, None
        blocks, results, pis = pending.result()
        for t in [*pis, *(t for r in results if r is not None for t in r)]:
            if t.is_cuda:  # made on the worker's stream, used from now on on this one
                t.record_stream(torch.cuda.current_stream(t.device))
        return self._apply(blocks, results, pis, relayout=False)

    def _decompose_now(self, blocks: list[Block]) -> Decomposed:
        blocks = [b for b in blocks if self._factors.has(b)]
        factors = [f for b in blocks for f in self._factors.factors(b)]
        if self._comm is None:
            results = [symmetric_eig(f) for f in factors]
        else:
            from rl_kfac.distributed import shared_eigendecompositions

            results = shared_eigendecompositions(self._comm, factors, symmetric_eig)
        return blocks, results, [pi_factor(*self._factors.factors(b)) for b in blocks]

    def _start(self, blocks: list[Block]) -> None:
        blocks = [b for b in blocks if self._factors.has(b)]
        snapshot = [f.clone() for b in blocks for f in self._factors.factors(b)]
        stream = None
        if snapshot and snapshot[0].is_cuda:  # the worker's stream must see the copies
            stream = torch.cuda.Stream(snapshot[0].device)
            stream.wait_stream(torch.cuda.current_stream(snapshot[0].device))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="kfac-eigen")
        self._pending = self._worker.submit(_decompose_copies, blocks, snapshot, stream)

    def _apply(
        self,
        blocks: list[Block],
        results: list[Eigen | None],
        pis: list[Tensor],
        relayout: bool = True,
    ) -> list[str]:
        failed = []
        for i, block in enumerate(blocks):
            state = self._state_of(block.weight)
            eig_a, eig_g = results[2 * i], results[2 * i + 1]
            if eig_a is None or eig_g is None:
                self.failures += 1
                failed.append(block.name)
                continue
            (state["eA"], state["QA"]), (state["eG"], state["QG"]) = eig_a, eig_g
            state["pi"] = pis[i]
        self.updates += 1
        if relayout and self._factors.take_new_blocks():  # a layer got its first factors
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
        if self._pending is not None:
            raise RuntimeError("finish() the background decomposition before copying")
        state = self.__dict__.copy()
        state["_layout"] = None  # buffers that view parameters: rebuilt on the next step
        state["_worker"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"Curvature(mode={self.mode!r}, dtype={self.dtype}, updates={self.updates}, "
            f"failures={self.failures})"
        )


def _decompose_copies(
    blocks: list[Block], factors: list[Tensor], stream: torch.cuda.Stream | None
) -> Decomposed:
    """The background job: eigendecompositions and π of copied factors (A, G per block)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        results = [symmetric_eig(f) for f in factors]
        pis = [pi_factor(a, g) for a, g in zip(factors[::2], factors[1::2])]
    if stream is not None:  # done on the device before the step that swaps them in
        stream.synchronize()
    return blocks, results, pis
