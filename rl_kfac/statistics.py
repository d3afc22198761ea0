"""Second stage: Kronecker factors per block and their running averages.

From the records of one statistics update, each block's batch factors are

    A_t = s_x XᵀX,   G_t = s_y YᵀY

with rows ``X``/``Y`` and scales ``s`` from :meth:`Block.input_rows` / :meth:`Block.grad_rows`;
a layer called ``c`` times in one forward pass contributes the mean over its calls (a recurrent
layer's calls on the same sequences are joined into one: they are its steps). The running
factors start at the first batch and then follow ``Ā ← Ā + (1 − β)(A_t − Ā)`` (β =
``stat_decay``; the same for G), the exponential average of Martens & Grosse (2015, §5).

The running factors live in the optimizer's per-parameter state (``state[weight]["A"]``,
``["G"]``), so ``KFAC.state_dict()`` saves them like any optimizer buffer. With a communicator the
batch factors are averaged across ranks asynchronously and folded in by :meth:`FactorStore.finish`
(at the next step); the finiteness check runs on the averaged factors, so every rank keeps or
skips the same update.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rl_kfac.blocks import Block
from rl_kfac.capture import Record
from rl_kfac.lazy_count import LazyCount
from rl_kfac.recurrent import RecurrentBlock
from rl_kfac.warn import warn_once

if TYPE_CHECKING:  # the math runs without torch.distributed; only a communicator uses it
    from rl_kfac.distributed import Communicator, PendingAverage

StateOf = Callable[[Tensor], dict[str, Any]]  # a parameter's optimizer state


def batch_factors(
    records: list[Record], dtype: torch.dtype, max_rows: int | None = None
) -> dict[Block, tuple[Tensor, Tensor]]:
    """``(A_t, G_t)`` per block of one statistics update (calls of one layer averaged).

    With ``max_rows``, a layer call with more rows than that uses ``max_rows`` of them, drawn
    uniformly without replacement (the same rows for A and G), scaled to unbiased estimates:
    ``A_t ≈ (1/m) Σ_sampled x xᵀ``, ``G_t ≈ s (R/m) Σ_sampled y yᵀ`` for ``R`` rows.
    """
    records = _join_steps(records)
    calls = Counter(r.block for r in records)
    batch: dict[Block, tuple[Tensor, Tensor]] = {}
    for record in records:
        block = record.block
        x, sx, y, sy = _rows(block, record.inputs.to(dtype), record.grad_output.to(dtype), max_rows)
        w, beta = 1.0 / calls[block], 1.0
        if block not in batch:
            a = x.new_empty(block.dim_a, block.dim_a)
            batch[block] = (a, y.new_empty(block.dim_g, block.dim_g))
            beta = 0.0
        new_a, new_g = batch[block]
        new_a.addmm_(x.T, x, beta=beta, alpha=w * sx)
        new_g.addmm_(y.T, y, beta=beta, alpha=w * sy)
    return batch


def _join_steps(records: list[Record]) -> list[Record]:
    """Forward calls of one recurrent layer with the same batch size N within one statistics
    update are taken as consecutive steps of the same N sequences (a policy stepping its LSTM
    once per step, or once per stretch of steps): joined along time, in call order, into one
    record, so that the factors are those of the whole sequences (:mod:`rl_kfac.recurrent`),
    not a mean over steps. Records of the same call (several backward passes) stay separate
    passes, averaged as any layer's calls are."""
    out: list[Record] = []
    groups: dict[tuple[Block, int], dict[int, list[Record]]] = {}
    for r in records:
        if isinstance(r.block, RecurrentBlock):
            groups.setdefault((r.block, r.inputs.shape[0]), {}).setdefault(r.call, []).append(r)
        else:
            out.append(r)
    for (block, _), by_call in groups.items():
        passes = {len(rs) for rs in by_call.values()}
        if len(by_call) == 1 or len(passes) != 1:
            out += [r for rs in by_call.values() for r in rs]
            continue
        for k in range(passes.pop()):  # the k-th backward pass through every call
            steps = [by_call[call][k] for call in sorted(by_call)]
            inputs = torch.cat([r.inputs for r in steps], 1)
            out.append(Record(block, inputs, torch.cat([r.grad_output for r in steps], 1)))
    return out


def _rows(
    block: Block, a: Tensor, g: Tensor, max_rows: int | None
) -> tuple[Tensor, float, Tensor, float]:
    """``X, s_x, Y, s_y`` of one layer call: all rows, or a uniform sample of ``max_rows``."""
    total = block.row_count(g)
    if max_rows is None or total <= max_rows:
        x, sx = block.input_rows(a)
        y, sy = block.grad_rows(g)
        return x, sx, y, sy
    index = torch.randperm(total, device=g.device)[:max_rows]
    x, y = block.rows_at(a, g, index)
    return x, 1.0 / max_rows, y, block.grad_scale(g) * total / max_rows


class FactorStore:
    """The running factors A and G of every block that has had statistics.

    Args:
        state_of: a parameter's optimizer state (looked up each time: ``load_state_dict``
            replaces it); this store owns the keys ``"A"`` and ``"G"`` of each block's weight.
        stat_decay: β of the running average.
        dtype: dtype the factors are accumulated in.
        communicator: averages batch factors across ranks (``None``: one process).
        max_rows: estimate each layer call's factors from at most this many rows
            (:func:`batch_factors`); ``None``: all rows.
        host_check: ``True`` — a non-finite update is detected on the host before it is
            folded in; ``False`` — on the device: the fold then keeps the old factors, and
            :attr:`skipped` reads the device's count (a layer's first factors are always
            checked on the host); ``None`` — on the host for CPU factors, else on the device.
    """

    def __init__(
        self,
        state_of: StateOf,
        stat_decay: float,
        dtype: torch.dtype,
        communicator: Communicator | None = None,
        max_rows: int | None = None,
        host_check: bool | None = None,
    ) -> None:
        self.state_of = state_of
        self.host_check = host_check
        self.max_rows = max_rows
        self.stat_decay = stat_decay
        self.dtype = dtype
        self._comm = communicator if communicator and communicator.world_size > 1 else None
        self._pending: tuple[list[Block], PendingAverage] | None = None
        self.updates = 0  # statistics updates folded in (or dropped as non-finite)
        self._skipped = LazyCount()  # statistics updates dropped as non-finite
        self._new_blocks = False
        self._warned: set[str] = set()

    @torch.no_grad()
    def add(self, records: list[Record]) -> None:
        """Fold one statistics update into the running factors (or start averaging it)."""
        if not records:
            return
        batch = batch_factors(records, self.dtype, self.max_rows)
        self.finish()  # at most one update in flight
        blocks = list(batch)
        factors = [f for b in blocks for f in batch[b]]
        if self._comm is not None:
            self._pending = (blocks, self._comm.average_async(factors))
        else:
            self._fold(blocks, factors)

    def finish(self) -> None:
        """Fold in the update whose cross-rank average is in flight, if any."""
        if self._pending is not None:
            (blocks, pending), self._pending = self._pending, None
            self._fold(blocks, pending.wait())

    @torch.no_grad()
    def _fold(self, blocks: list[Block], factors: list[Tensor]) -> None:
        finite = torch.stack(torch._foreach_norm(factors)).isfinite().all()
        first = any("A" not in self.state_of(b.weight) for b in blocks)
        on_host = self.host_check if self.host_check is not None else finite.device.type == "cpu"
        if (on_host or first) and not bool(finite):
            self._skipped.value += 1
            self._warn_skipped()
            return
        for block, new_a, new_g in zip(blocks, factors[::2], factors[1::2]):
            state = self.state_of(block.weight)
            if "A" not in state:  # the running average starts at the first batch
                state["A"], state["G"] = new_a.clone(), new_g.clone()
                self._new_blocks = True
            elif on_host:
                state["A"].lerp_(new_a, 1.0 - self.stat_decay)
                state["G"].lerp_(new_g, 1.0 - self.stat_decay)
            else:  # a non-finite update moves toward the old factors: they stay as they were
                state["A"].lerp_(torch.where(finite, new_a, state["A"]), 1.0 - self.stat_decay)
                state["G"].lerp_(torch.where(finite, new_g, state["G"]), 1.0 - self.stat_decay)
        if not on_host:
            self._skipped.add_flag(~finite)
        self.updates += 1

    def _warn_skipped(self) -> None:
        warn_once(self._warned, "stats", "non-finite K-FAC statistics skipped (factors kept)")

    @property
    def skipped(self) -> int:
        """Statistics updates dropped as non-finite (reads the device's count, if any)."""
        n = self._skipped.settle()
        if n:  # counted in ``updates`` when folded on the device
            self.updates -= n
            self._warn_skipped()
        return self._skipped.value

    def has(self, block: Block) -> bool:
        return "A" in self.state_of(block.weight)

    def factors(self, block: Block) -> tuple[Tensor, Tensor]:
        """The running ``(A, G)`` of ``block``."""
        state = self.state_of(block.weight)
        return state["A"], state["G"]

    @property
    def new_blocks(self) -> bool:
        """Whether some block got its first factors (and so needs an eigenbasis)."""
        return self._new_blocks

    def take_new_blocks(self) -> bool:
        """Whether some block got its first factors since the last call."""
        new, self._new_blocks = self._new_blocks, False
        return new

    def load_counters(self, updates: int, skipped: int) -> None:
        self.updates, self._skipped = updates, LazyCount(skipped)

    def __getstate__(self) -> dict[str, Any]:
        self.finish()
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return (
            f"FactorStore(stat_decay={self.stat_decay}, dtype={self.dtype}, "
            f"updates={self.updates}, skipped={self.skipped})"
        )
