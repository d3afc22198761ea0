"""K-FAC as a ``torch.optim.Optimizer``, with ACKTR's trust-region step clip.

One step is: precondition each supported layer's gradient with its damped Kronecker factors →
scale the whole step by the trust-region factor ν → momentum → ``θ ← θ - lr (1 - m) buf``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from rl_kfac.blocks import Block, ConvApprox
from rl_kfac.capture import Record, StatisticsCapture
from rl_kfac.curvature import Bucket, plan_buckets, symmetric_eig
from rl_kfac.damping import DAMPING_MODES, DampingMode, pi_factor

if TYPE_CHECKING:  # the math runs without torch.distributed; only a communicator uses it
    from rl_kfac.distributed import Communicator, PendingAverage

Statistics = Literal["explicit", "empirical"]

_COUNTERS = (
    "steps",
    "statistics_updates",
    "inverse_updates",
    "skipped_steps",
    "skipped_statistics",
    "eig_failures",
)


class _GroupLayout:
    """Per parameter group: the buckets of preconditioned blocks and the plain parameters."""

    def __init__(self, buckets: list[Bucket], plain: list[Tensor]) -> None:
        self.buckets, self.plain = buckets, plain
        self.params = [p for b in buckets for p in b.params] + plain
        self.momentum: list[Tensor] | None = None  # buffers of ``params``, once they exist


class KFAC(Optimizer):
    r"""Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016)
    with the trust-region clip of ACKTR (Wu et al. 2017).

    Args:
        model_or_params: an ``nn.Module`` (its ``nn.Linear``/``nn.Conv2d`` layers are found now),
            or an iterable of parameters / parameter groups as for any torch optimizer (the layers
            owning them are found on the first forward pass; Stable-Baselines3 passes these).
        lr: learning rate η (per group).
        momentum: momentum ``m`` applied after the clip, in the exponential-average form of
            ACKTR's reference code: ``buf ← m·buf + ν v``, ``θ ← θ − lr (1−m) buf``, so momentum
            smooths the clipped step instead of growing it ``1/(1−m)``-fold. 0 disables it.
        stat_decay: running-average decay of A and G; the average starts at the first batch.
        damping: Tikhonov damping λ (per group, so schedules/controllers may change it).
        kl_clip: trust region c; the step is scaled by ``ν = min(1, sqrt(c / (η² Σ_p ⟨v_p, g_p⟩)))``
            with ``v = F̂⁻¹ g`` (the ACKTR code's form; the paper's ``sqrt(2δ/…)`` is
            ``kl_clip = 2δ``). ``None`` disables the clip.
        weight_decay: L2 coefficient added to the gradient before preconditioning (per group).
        factor_update_interval: statistics are recorded on steps ``k`` with ``k % T == 0``.
        inverse_update_interval: factors are eigendecomposed on steps ``k`` with ``k % T == 0``.
        damping_mode: ``"exact"`` — ``(A ⊗ G + λI)⁻¹``; ``"pi"`` — factored Tikhonov
            ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹``.
        conv_approx: ``"expand"`` or ``"reduce"`` for ``nn.Conv2d`` (Eschenhagen et al. 2023).
        factor_dtype: dtype of factors, eigenbases and preconditioning (float32 by default).
        statistics: ``"explicit"`` — recorded only inside :meth:`record_statistics` /
            :meth:`fisher_backward` (pass a sampled-Fisher loss: the true Fisher);
            ``"empirical"`` — recorded from every backward pass taken while statistics are due,
            i.e. from the training loss's own gradients (the *empirical* Fisher, Kunstner et al.
            2019). For training loops you do not control, such as Stable-Baselines3's.
        communicator: a :class:`rl_kfac.distributed.Communicator` for data-parallel training:
            factors are averaged across ranks and eigendecompositions shared out (gradients are
            the caller's: :func:`rl_kfac.distributed.allreduce_gradients`). ``None``: one process.

    Parameters owned by no supported layer (e.g. a Gaussian policy's log-std, depthwise convs)
    get the plain gradient, and that gradient counts in the trust-region clip.

    Statistics are recorded only inside :meth:`record_statistics`, around the backward pass of a
    Fisher loss: the batch *mean* negative log-likelihood of targets sampled from the model's
    own predictive distribution.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.25,
        momentum: float = 0.9,
        stat_decay: float = 0.99,
        damping: float = 1e-2,
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        damping_mode: DampingMode = "exact",
        conv_approx: ConvApprox = "expand",
        factor_dtype: torch.dtype = torch.float32,
        statistics: Statistics = "explicit",
        communicator: Communicator | None = None,
    ) -> None:
        _check(lr > 0, f"lr must be > 0, got {lr}")
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _check(0 <= stat_decay < 1, f"stat_decay must be in [0, 1), got {stat_decay}")
        _check(damping > 0, f"damping must be > 0, got {damping}")
        _check(kl_clip is None or kl_clip > 0, f"kl_clip must be > 0 or None, got {kl_clip}")
        _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        for name, value in (
            ("factor_update_interval", factor_update_interval),
            ("inverse_update_interval", inverse_update_interval),
        ):
            _check(
                isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value}"
            )
        _check(damping_mode in DAMPING_MODES, f"damping_mode must be one of {DAMPING_MODES}")
        _check(conv_approx in ("expand", "reduce"), "conv_approx must be 'expand' or 'reduce'")
        _check(factor_dtype.is_floating_point, f"factor_dtype must be floating, got {factor_dtype}")
        _check(
            statistics in ("explicit", "empirical"),
            f"statistics must be 'explicit' or 'empirical', got {statistics!r}",
        )

        model = model_or_params if isinstance(model_or_params, nn.Module) else None
        params: Any = (
            [p for p in model.parameters() if p.requires_grad] if model else model_or_params
        )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.stat_decay = stat_decay
        self.kl_clip = kl_clip
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.damping_mode: DampingMode = damping_mode
        self.conv_approx: ConvApprox = conv_approx
        self.factor_dtype = factor_dtype
        self.statistics: Statistics = statistics
        self.communicator = communicator
        self._pending: tuple[list[Block], PendingAverage] | None = None
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.diagnostics: dict[str, float] = {}
        self._capture = StatisticsCapture(conv_approx)
        self._capture.empirical = statistics == "empirical"
        if model is not None:
            self._capture.add_model(model)
        else:
            self._capture.start_discovery(p for g in self.param_groups for p in g["params"])
        self._layout: list[_GroupLayout] | None = None
        self._layout_blocks = 0  # number of known layers when the layout was built
        self._needs_eigen = False
        self._warned: set[str] = set()

    # -- statistics ---------------------------------------------------------------------------
    @contextmanager
    def record_statistics(self) -> Iterator[None]:
        """Record K-FAC statistics from the backward passes run inside this context."""
        cap = self._capture
        cap.recording = True
        try:
            yield
        finally:
            cap.recording = False
            cap.forward_log.clear()
            records = cap.take_records()
        self._update_factors(records)

    def fisher_backward(self, fisher_loss: Tensor, retain_graph: bool = True) -> None:
        """Record statistics from ``fisher_loss``, back-propagating only what they need.

        Same statistics as ``with opt.record_statistics(): fisher_loss.backward()``, but the
        backward pass stops at the first supported layers and computes no weight gradients
        (``.grad`` is left untouched), and nothing runs when ``statistics_due`` is ``False``.
        """
        cap = self._capture
        if not cap.armed:
            return
        log, cap.forward_log = cap.forward_log, []
        # Stop at the outputs of the first layers; where an in-place op changed such an output
        # since (its hook sits on the old version), go through the layer's weight instead.
        roots = [
            c.output if c.output._version == c.version else c.block.weight for c in log if c.is_root
        ]
        with self.record_statistics():
            if roots:
                torch.autograd.grad(fisher_loss, roots, retain_graph=True, allow_unused=True)
            seen = {r[0] for r in cap.records}
            missing = list(dict.fromkeys(c.block for c in log if c.block not in seen))
            if missing:  # layers behind untracked parameters: reach them through their weights
                cap.only = set(missing)
                try:
                    torch.autograd.grad(
                        fisher_loss,
                        [b.weight for b in missing],
                        retain_graph=retain_graph,
                        allow_unused=True,
                    )
                finally:
                    cap.only = None

    @property
    def statistics_due(self) -> bool:
        """Whether the next ``record_statistics()`` records (``factor_update_interval``).

        Callers may skip building and back-propagating the Fisher loss when it is ``False``.
        """
        return self._capture.armed

    @property
    def blocks(self) -> list[Block]:
        """The layers found so far, as curvature blocks."""
        return list(self._capture.blocks.values())

    @torch.no_grad()
    def _update_factors(self, records: list[Record]) -> None:
        """This batch's factors per block (calls of one layer averaged), then the running mean.

        With a communicator the batch factors are averaged across ranks asynchronously and
        folded in at the next ``step()``; the finiteness check runs on the averaged factors, so
        every rank skips or keeps the same update.
        """
        if not records:
            return
        dtype = self.factor_dtype
        calls = Counter(r[0] for r in records)
        batch: dict[Block, tuple[Tensor, Tensor]] = {}
        for block, a, g in records:
            x, sx = block.input_rows(a.to(dtype))
            y, sy = block.grad_rows(g.to(dtype))
            w, beta = 1.0 / calls[block], 1.0
            if block not in batch:
                batch[block] = (x.new_empty(block.dim_a, block.dim_a),
                                y.new_empty(block.dim_g, block.dim_g))  # fmt: skip
                beta = 0.0
            new_a, new_g = batch[block]
            new_a.addmm_(x.T, x, beta=beta, alpha=w * sx)
            new_g.addmm_(y.T, y, beta=beta, alpha=w * sy)
        self._finish_factors()  # at most one update in flight
        blocks = list(batch)
        factors = [f for b in blocks for f in batch[b]]
        if self.communicator is not None and self.communicator.world_size > 1:
            self._pending = (blocks, self.communicator.average_async(factors))
        else:
            self._fold_factors(blocks, factors)

    def _finish_factors(self) -> None:
        if self._pending is not None:
            (blocks, pending), self._pending = self._pending, None
            self._fold_factors(blocks, pending.wait())

    def _fold_factors(self, blocks: list[Block], factors: list[Tensor]) -> None:
        if not bool(torch.stack(torch._foreach_norm(factors)).isfinite().all()):
            self.counters["skipped_statistics"] += 1
            self._warn_once("stats", "non-finite K-FAC statistics were skipped (factors kept)")
            return
        for block, new_a, new_g in zip(blocks, factors[::2], factors[1::2]):
            state = self.state[block.weight]
            if "A" not in state:  # the running average starts at the first batch
                state["A"], state["G"] = new_a.clone(), new_g.clone()
                self._needs_eigen = True
            else:
                state["A"].lerp_(new_a, 1.0 - self.stat_decay)
                state["G"].lerp_(new_g, 1.0 - self.stat_decay)
        self.counters["statistics_updates"] += 1

    # -- eigendecompositions and layout -------------------------------------------------------
    def _update_eigen(self) -> None:
        blocks = [b for b in self.blocks if "A" in self.state[b.weight]]
        factors = [(b, name) for b in blocks for name in ("A", "G")]
        comm = self.communicator
        if comm is None or comm.world_size == 1:
            results = [symmetric_eig(self.state[b.weight][name]) for b, name in factors]
        else:  # each factor decomposed by one rank, then broadcast
            owners = comm.assign([float(b.dim_a if n == "A" else b.dim_g) ** 3 for b, n in factors])
            results = [
                _broadcast_eig(
                    comm,
                    symmetric_eig(self.state[b.weight][name]) if owner == comm.rank else None,
                    self.state[b.weight][name],
                    owner,
                )
                for (b, name), owner in zip(factors, owners)
            ]
        for i, block in enumerate(blocks):
            state = self.state[block.weight]
            eig_a, eig_g = results[2 * i], results[2 * i + 1]
            if eig_a is None or eig_g is None:
                self.counters["eig_failures"] += 1
                self._warn_once(
                    "eig", f"eigendecomposition failed for {block.name}; kept last basis"
                )
                continue
            (state["eA"], state["QA"]), (state["eG"], state["QG"]) = eig_a, eig_g
            state["pi"] = pi_factor(state["A"], state["G"])
        self.counters["inverse_updates"] += 1
        if self._needs_eigen:  # a layer got its first factors: the buckets change
            self._layout = None
        elif self._layout is not None:
            for lay in self._layout:
                for bucket in lay.buckets:
                    self._load_eigen(bucket)
        self._needs_eigen = False

    def _load_eigen(self, bucket: Bucket) -> None:
        for i, b in enumerate(bucket.blocks):
            s = self.state[b.weight]
            bucket.set_eigen(i, (s["eA"], s["QA"]), (s["eG"], s["QG"]), s["pi"])

    def _build_layout(self) -> list[_GroupLayout]:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        ready: list[list[Block]] = [[] for _ in self.param_groups]
        for block in self.blocks:
            if "QA" not in self.state[block.weight]:
                continue
            groups = {group_of.get(id(p)) for p in block.params}
            if len(groups) != 1 or None in groups:
                raise ValueError(f"{block.name}: weight and bias must be in the same param group")
            ready[groups.pop()].append(block)  # type: ignore[index]
        layout = []
        for group, blocks in zip(self.param_groups, ready):
            owned = {id(p) for b in blocks for p in b.params}
            buckets = []
            for members in plan_buckets(blocks):
                bucket = Bucket(members, self.factor_dtype, members[0].weight.device)
                self._load_eigen(bucket)
                buckets.append(bucket)
            plain = [p for p in group["params"] if id(p) not in owned]
            layout.append(_GroupLayout(buckets, plain))
        return layout

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.statistics == "empirical":
            self._update_factors(self._capture.take_records())
        self._finish_factors()
        self._check_setup()
        if self._needs_eigen or self.counters["steps"] % self.inverse_update_interval == 0:
            self._update_eigen()
        if self._layout is None:
            self._layout = self._build_layout()
            self._layout_blocks = len(self._capture.blocks)

        directions, quads = [], []
        for group, lay in zip(self.param_groups, self._layout):
            pairs, quad = self._precondition(group, lay)
            directions.append(pairs)
            quads.append(quad)
        device = quads[0].device
        quad_values = torch.stack([q.to(device) for q in quads]).tolist()  # the step's one sync
        self.counters["steps"] += 1
        self._capture.forward_log.clear()
        self._capture.armed = self.counters["steps"] % self.factor_update_interval == 0
        if not all(math.isfinite(q) for q in quad_values):
            self.counters["skipped_steps"] += 1
            self._warn_once("step", "non-finite gradient or update: K-FAC step skipped")
            self._set_diagnostics(float("nan"), float("nan"))
            return loss

        nu = 1.0
        if self.kl_clip is not None:
            weighted = sum(
                g["lr"] ** 2 * max(q, 0.0) for g, q in zip(self.param_groups, quad_values)
            )
            nu = min(1.0, math.sqrt(self.kl_clip / weighted)) if weighted > 0 else 1.0
        for group, lay, (params, dirs) in zip(self.param_groups, self._layout, directions):
            self._apply(group, lay, params, dirs, nu)
        self._set_diagnostics(nu, sum(quad_values))
        return loss

    def _precondition(
        self, group: dict[str, Any], lay: _GroupLayout
    ) -> tuple[tuple[list[Tensor], list[Tensor]], Tensor]:
        """Preconditioned directions ``v`` (with their params) and ``Σ ⟨v, g⟩`` of one group."""
        wd, damping = group["weight_decay"], group["damping"]
        params: list[Tensor] = []
        dirs: list[Tensor] = []
        quad = torch.zeros((), dtype=self.factor_dtype, device=_device_of(group))
        for bucket in lay.buckets:
            _gather(bucket.grad_views, bucket.params)
            if wd:
                torch._foreach_add_(bucket.grad_views, bucket.params, alpha=wd)
            update = bucket.precondition(damping, self.damping_mode)
            quad = quad + torch.vdot(update.flatten(), bucket.grad.flatten())
            params += bucket.params
            dirs += bucket.update_views
        plain = [p for p in lay.plain if p.grad is not None]
        if plain:
            grads: list[Tensor] = [p.grad for p in plain]  # type: ignore[misc]
            if wd:
                grads = list(torch._foreach_add(grads, plain, alpha=wd))
            sq = torch._foreach_norm(grads)
            quad = quad + torch.stack(sq).to(quad.dtype).square().sum()
            params += plain
            dirs += grads
        return (params, dirs), quad

    def _apply(
        self,
        group: dict[str, Any],
        lay: _GroupLayout,
        params: list[Tensor],
        dirs: list[Tensor],
        nu: float,
    ) -> None:
        lr, mom = group["lr"], group["momentum"]
        if not params:
            return
        if mom == 0:
            torch._foreach_add_(params, dirs, alpha=-lr * nu)
            return
        if lay.momentum is not None and len(params) == len(lay.params):
            bufs = lay.momentum
        else:
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            if len(params) == len(lay.params):
                lay.momentum = bufs
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, dirs, alpha=nu)
        torch._foreach_add_(params, bufs, alpha=-lr * (1.0 - mom))

    # -- bookkeeping --------------------------------------------------------------------------
    def _check_setup(self) -> None:
        cap = self._capture
        if cap.discovering and cap.blocks:
            cap.end_discovery()
        for message in cap.unsupported:
            self._warn_once(message, message + "; its parameters get the plain gradient")
        if self._layout is not None and self._layout_blocks == len(cap.blocks):
            return
        self._layout = None  # layers were found since the last layout
        missing = [b.name for b in self.blocks if "A" not in self.state[b.weight]]
        if missing:
            self._warn_once(
                "missing",
                f"no K-FAC statistics yet for {missing}: plain gradient until "
                "record_statistics() sees them (statistics='empirical' records them from the "
                "training loss instead)",
            )

    def _set_diagnostics(self, nu: float, quad: float) -> None:
        self.diagnostics = {
            "step_scale": nu,
            "quadratic": quad,
            "damping": float(self.param_groups[0]["damping"]),
            **{k: float(v) for k, v in self.counters.items()},
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def remove_hooks(self) -> None:
        """Detach all hooks from the model (the optimizer then only takes plain-gradient steps)."""
        self._capture.remove()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._finish_factors()
        sd = super().state_dict()
        sd["kfac"] = {k: torch.tensor(v) for k, v in self.counters.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("kfac", None)
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("A", "G", "QA", "eA", "QG", "eG", "pi"):
                if key in state:
                    state[key] = state[key].to(self.factor_dtype)
        if counters is not None:
            self.counters.update({k: int(v) for k, v in counters.items()})
        self._capture.armed = self.counters["steps"] % self.factor_update_interval == 0
        self._layout = None

    def __getstate__(self) -> dict[str, Any]:
        self._finish_factors()
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if k not in state})
        state["_layout"] = None  # buffers that view parameters: rebuilt on the next step
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"KFAC(lr={g['lr']}, momentum={g['momentum']}, damping={g['damping']}, "
            f"weight_decay={g['weight_decay']}, kl_clip={self.kl_clip}, "
            f"stat_decay={self.stat_decay}, factor_update_interval={self.factor_update_interval}, "
            f"inverse_update_interval={self.inverse_update_interval}, "
            f"damping_mode={self.damping_mode!r}, conv_approx={self.conv_approx!r}, "
            f"factor_dtype={self.factor_dtype}, statistics={self.statistics!r}, "
            f"blocks={len(self.blocks)})"
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _device_of(group: dict[str, Any]) -> torch.device:
    return group["params"][0].device


def _gather(views: list[Tensor], params: list[Tensor]) -> None:
    """Copy each parameter's gradient into its view (zero where the gradient is ``None``)."""
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):  # not `None in grads`: that compares tensors
        torch._foreach_copy_(views, grads)  # type: ignore[arg-type]
        return
    dst, src = [], []
    for v, p in zip(views, params):
        if p.grad is None:
            v.zero_()
        else:
            dst.append(v)
            src.append(p.grad)
    if dst:
        torch._foreach_copy_(dst, src)


def _broadcast_eig(
    comm: Communicator, eig: tuple[Tensor, Tensor] | None, factor: Tensor, owner: int
) -> tuple[Tensor, Tensor] | None:
    """The owner's eigendecomposition of ``factor`` on every rank (``None`` if it failed)."""
    ok = torch.tensor([float(eig is not None)], device=factor.device)
    comm.broadcast([ok], owner)
    if not bool(ok):
        return None
    if eig is None:
        n = factor.shape[0]
        eig = (factor.new_empty(n), factor.new_empty(n, n))
    else:  # eigh returns column-major eigenvectors; collectives send raw storage
        eig = (eig[0].contiguous(), eig[1].contiguous())
    comm.broadcast(list(eig), owner)
    return eig
