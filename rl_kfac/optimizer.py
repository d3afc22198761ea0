"""K-FAC as a ``torch.optim.Optimizer``, with ACKTR's trust-region step clip.

The optimizer runs the pipeline's stages in order, each in its own module:

    capture (rl_kfac.capture)        hooks record layer inputs and output gradients
      → statistics (rl_kfac.statistics)  batch factors A, G and their running averages
      → curvature (rl_kfac.curvature)    eigendecompositions every T steps, buckets
      → step (here)                      precondition, trust-region scale ν, momentum, update

One step: precondition each supported layer's gradient with its damped Kronecker factors →
scale the whole step by the trust-region factor ν → momentum → ``θ ← θ − lr (1 − m) buf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from rl_kfac.blocks import Block, ConvApprox
from rl_kfac.capture import StatisticsCapture
from rl_kfac.curvature import INVERSE_MODES, Curvature, GroupLayout, InverseMode
from rl_kfac.damping import DAMPING_MODES, DampingMode
from rl_kfac.diagnostics import Diagnostics
from rl_kfac.kl_guard import GuardResult, KLMeasure, Snapshot, backtrack
from rl_kfac.lazy_count import LazyCount
from rl_kfac.recurrent import RecurrentApprox
from rl_kfac.statistics import FactorStore
from rl_kfac.warn import warn_once

if TYPE_CHECKING:  # the math runs without torch.distributed; only a communicator uses it
    from rl_kfac.distributed import Communicator

Statistics = Literal["explicit", "empirical"]
STATISTICS: tuple[Statistics, ...] = ("explicit", "empirical")
MAX_LR = 1e6  # far above any K-FAC learning rate; larger ones overflow float32 updates
HostSync = Literal["auto", "step", "log"]
HOST_SYNCS: tuple[HostSync, ...] = ("auto", "step", "log")
ClipLR = Literal["current", "initial"]
CLIP_LRS: tuple[ClipLR, ...] = ("current", "initial")


class KFAC(Optimizer):
    r"""Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016)
    with the trust-region clip of ACKTR (Wu et al. 2017).

    Args:
        model_or_params: an ``nn.Module`` (its ``nn.Linear``/``nn.Conv2d`` and recurrent layers
            are found now), or an iterable of parameters / parameter groups as for any torch
            optimizer (the layers owning them are found on the first forward pass;
            Stable-Baselines3 passes these). A group may set ``fisher_diagonal`` (see below).
        lr: learning rate η (per group).
        momentum: momentum ``m`` applied after the clip, in the exponential-average form of
            ACKTR's reference code: ``buf ← m·buf + ν v``, ``θ ← θ − lr (1−m) buf``, so momentum
            smooths the clipped step instead of growing it ``1/(1−m)``-fold. 0 disables it.
        stat_decay: running-average decay of A and G; the average starts at the first batch.
        damping: Tikhonov damping λ (per group, so schedules/controllers may change it).
        kl_clip: trust region c; the step is scaled by ``ν = min(1, sqrt(c / (η² Σ_p ⟨v_p, g_p⟩)))``
            with ``v = F̂⁻¹ g`` (the ACKTR code's form; the paper's ``sqrt(2δ/…)`` is
            ``kl_clip = 2δ``). ``None`` disables the clip.
        kl_clip_lr: the η in ν's formula. ``"current"`` (default, ACKTR's): the group's ``lr``
            now, so a clipped step ``η ν v = sqrt(c / Σ⟨v, g⟩) v`` has the same length whatever
            the learning rate is, and a schedule only acts once the clip stops binding.
            ``"initial"``: each group's ``initial_lr`` (its ``lr`` when the optimizer was made;
            torch's LR schedulers keep the same key), so the clip is decided at the initial rate
            and a schedule scales the clipped step by ``lr / initial_lr``, as it scales a
            first-order step; the step's KL then shrinks with ``(lr / initial_lr)²``.
        weight_decay: L2 coefficient added to the gradient before preconditioning (per group).
        factor_update_interval: statistics are recorded on steps ``k`` with ``k % T == 0``.
        inverse_update_interval: factors are eigendecomposed on steps ``k`` with ``k % T == 0``.
        damping_mode: ``"exact"`` — ``(A ⊗ G + λI)⁻¹``; ``"pi"`` — factored Tikhonov
            ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹``.
        conv_approx: ``"expand"`` or ``"reduce"`` for ``nn.Conv2d`` (Eschenhagen et al. 2023).
        recurrent_approx: the same for the steps of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` layers
            (:mod:`rl_kfac.recurrent`).
        factor_dtype: dtype of factors, eigenbases and preconditioning (float32 by default).
        statistics: ``"explicit"`` — recorded only inside :meth:`record_statistics` /
            :meth:`fisher_backward`, around the backward pass of a Fisher loss: the batch *mean*
            negative log-likelihood of targets sampled from the model's own predictive
            distribution (the true Fisher; :mod:`rl_kfac.fisher`). ``"empirical"`` — recorded
            from every backward pass taken while statistics are due, i.e. from the training
            loss's own gradients (the *empirical* Fisher, Kunstner et al. 2019), for training
            loops you do not control, such as Stable-Baselines3's.
        statistics_rows: estimate each layer's A and G from at most this many rows per call,
            drawn uniformly at random (unbiased; Grosse & Martens 2016 subsample conv positions
            the same way). Rows are batch samples, and for conv ``expand`` also positions (for a
            recurrent layer's ``expand``, steps), so a Nature CNN's first layer at batch 640 has
            256,000; only the drawn patches are built.
            ``None`` (default): every row, exactly.
        inverse_mode: ``"sync"`` (default) — due eigendecompositions run inside ``step()``;
            ``"background"`` — they run in a worker thread (side stream on CUDA) from a copy of
            the factors and are swapped in at the next step, so the eigenbases lag by one step
            (deterministic; see :class:`rl_kfac.curvature.Curvature`). One process only.
        host_sync: ``"step"`` — the step reads its trust-region quantities on the host (exact,
            and free on a CPU); ``"log"`` — ν, the skip decision, the statistics' finiteness
            check and the skipped counters stay on the parameters' device, so a step on an
            accelerator does not wait for them: the host reads them only when
            :attr:`diagnostics` or :attr:`counters` are read (e.g. every ``log_interval``), and
            the skipped-step warning comes then. ``"auto"`` (default): ``"log"`` on CUDA,
            ``"step"`` elsewhere, decided at each step from the parameters' device (SB3 moves
            the policy after making its optimizer). The two agree to rounding. Still read on
            the host: a layer's first factors, and in ``inverse_mode="sync"`` the status of due
            eigendecompositions (every ``inverse_update_interval`` steps; the background mode
            runs them on a side stream).
        communicator: a :class:`rl_kfac.distributed.Communicator` for data-parallel training:
            factors are averaged across ranks and eigendecompositions shared out (gradients are
            the caller's: :func:`rl_kfac.distributed.allreduce_gradients`). ``None``: one process.
        model: with parameter groups as ``model_or_params``, the module owning exactly those
            parameters: its layers are found now, as for a module given whole, and named by
            their path in it (so checkpoints match those of ``KFAC(model)``).
        kl_guard: checks each step's *measured* KL(π_old ‖ π_new) against ``kl_guard · kl_clip``
            and shrinks or undoes a step past it (:mod:`rl_kfac.kl_guard`; TRPO's backtracking),
            counted in ``rejected_steps``. The KL comes from the caller: ``step(kl=fn)`` or
            :meth:`check_next_step`; a step given none is not checked. ``None`` (default): no
            check, the exact ACKTR step. Needs a ``kl_clip``.
        kl_guard_backtracks: shrinks of a step past the bound before it is undone.

    Parameters owned by no supported layer (e.g. a Gaussian policy's log-std, depthwise convs)
    get the plain gradient, and that gradient counts in the trust-region clip, unless their
    group sets ``fisher_diagonal=f``: a Fisher known to be ``f·I`` for them, with no cross term
    to the other parameters, preconditions them exactly as ``v = g / (f + λ)`` (e.g.
    :data:`rl_kfac.fisher.GAUSSIAN_LOG_STD_FISHER` for a state-independent log-std).

    A group that sets ``kl_clip`` has a trust region of its own: its step is scaled by a ν
    computed from its own ``⟨v, g⟩`` and that radius (``inf`` or ``None``: never scaled), and it
    leaves the shared one. E.g. a critic's parameters, whose Gauss-Newton term would otherwise
    spend the policy's trust region while the value errors are large (OpenAI baselines'
    continuous-control ACKTR gives its value function an optimizer and clip of its own;
    :func:`rl_kfac.actor_critic.kfac_param_groups`).

    ``state_dict()`` holds, besides torch's ``param_groups``: per layer weight the running
    factors ``A``, ``G`` and their eigendecompositions ``eA, QA, eG, QG`` and ``pi``; per
    parameter its ``momentum_buffer``; under ``"kfac"`` the counters of :attr:`diagnostics`
    and the trust-region radius (which :meth:`set_kl_clip` may have moved).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.25,
        momentum: float = 0.9,
        stat_decay: float = 0.99,
        damping: float = 1e-2,
        kl_clip: float | None = 1e-3,
        kl_clip_lr: ClipLR = "current",
        weight_decay: float = 0.0,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        damping_mode: DampingMode = "exact",
        conv_approx: ConvApprox = "expand",
        recurrent_approx: RecurrentApprox = "expand",
        factor_dtype: torch.dtype = torch.float32,
        statistics: Statistics = "explicit",
        communicator: Communicator | None = None,
        statistics_rows: int | None = None,
        inverse_mode: InverseMode = "sync",
        host_sync: HostSync = "auto",
        model: nn.Module | None = None,
        kl_guard: float | None = None,
        kl_guard_backtracks: int = 5,
    ) -> None:
        _check(0 < lr <= MAX_LR, f"lr must be in (0, {MAX_LR:g}], got {lr}")
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _check(0 <= stat_decay < 1, f"stat_decay must be in [0, 1), got {stat_decay}")
        _check(0 < damping < math.inf, f"damping must be > 0 and finite, got {damping}")
        _check(
            kl_clip is None or 0 < kl_clip < math.inf,
            f"kl_clip must be > 0 and finite, or None, got {kl_clip}",
        )
        _check(
            kl_guard is None or (kl_clip is not None and 0 < kl_guard < math.inf),
            f"kl_guard must be > 0 and finite (with a kl_clip), or None, got {kl_guard} "
            f"(kl_clip {kl_clip})",
        )
        _check(
            type(kl_guard_backtracks) is int and kl_guard_backtracks >= 0,
            f"kl_guard_backtracks must be an int >= 0, got {kl_guard_backtracks}",
        )
        _check(kl_clip_lr in CLIP_LRS, f"kl_clip_lr must be one of {CLIP_LRS}, got {kl_clip_lr!r}")
        _check(
            0 <= weight_decay < math.inf,
            f"weight_decay must be >= 0 and finite, got {weight_decay}",
        )
        for name, value in (
            ("factor_update_interval", factor_update_interval),
            ("inverse_update_interval", inverse_update_interval),
        ):
            _check(
                isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value}"
            )
        _check(damping_mode in DAMPING_MODES, f"damping_mode must be one of {DAMPING_MODES}")
        _check(conv_approx in ("expand", "reduce"), "conv_approx must be 'expand' or 'reduce'")
        _check(
            recurrent_approx in ("expand", "reduce"),
            "recurrent_approx must be 'expand' or 'reduce'",
        )
        _check(factor_dtype.is_floating_point, f"factor_dtype must be floating, got {factor_dtype}")
        _check(
            statistics in STATISTICS, f"statistics must be one of {STATISTICS}, got {statistics!r}"
        )
        _check(inverse_mode in INVERSE_MODES, f"inverse_mode must be one of {INVERSE_MODES}")
        _check(host_sync in HOST_SYNCS, f"host_sync must be one of {HOST_SYNCS}")
        _check(
            statistics_rows is None
            or (type(statistics_rows) is int and statistics_rows >= 1),  # not a bool
            f"statistics_rows must be an int >= 1 or None, got {statistics_rows}",
        )

        params: Any = model_or_params
        if isinstance(model_or_params, nn.Module):
            _check(model is None, "model= goes with parameter groups only")
            model = model_or_params
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        if model is not None:
            given = {id(p) for g in self.param_groups for p in g["params"]}
            owned = {id(p) for p in model.parameters() if p.requires_grad}
            _check(given == owned, "model= must own exactly the optimizer's parameters")
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])  # kl_clip_lr "initial" (kept if given)
            own = group.get("kl_clip", 1.0)
            _check(
                own is None or (isinstance(own, (int, float)) and 0 < own <= math.inf),
                f"a group's kl_clip must be > 0 (inf: no clip), or None, got {own}",
            )
            f = group.get("fisher_diagonal")
            _check(
                f is None
                or (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < math.inf),
                f"fisher_diagonal must be > 0 and finite, or None, got {f}",
            )
        self.stat_decay = stat_decay
        self.kl_clip = kl_clip
        self.kl_clip_lr: ClipLR = kl_clip_lr
        self.kl_guard, self.kl_guard_backtracks = kl_guard, kl_guard_backtracks
        self._next_kl: KLMeasure | None = None  # check_next_step's, for the next step only
        self._guarded: GuardResult | None = None  # what the guard did to the last step
        self._rejected_steps = 0
        self._rejected_unread = 0  # since pop_rejected_steps()
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.damping_mode: DampingMode = damping_mode
        self.conv_approx: ConvApprox = conv_approx
        self.recurrent_approx: RecurrentApprox = recurrent_approx
        self.factor_dtype = factor_dtype
        self.statistics: Statistics = statistics
        self.communicator = communicator
        self._capture = StatisticsCapture(conv_approx, statistics == "empirical", recurrent_approx)
        if model is not None:
            self._capture.add_model(model)
        else:
            self._capture.start_discovery(p for g in self.param_groups for p in g["params"])
        self.statistics_rows = statistics_rows
        self.host_sync: HostSync = host_sync
        self._factors = FactorStore(
            self._param_state,
            stat_decay,
            factor_dtype,
            communicator,
            statistics_rows,
            host_check={"step": True, "log": False, "auto": None}[host_sync],
        )
        self.inverse_mode: InverseMode = inverse_mode
        self._curvature = Curvature(self._factors, communicator, inverse_mode)
        self._steps = 0
        self._skipped_steps = LazyCount()
        # ν and quadratic form of the last step (tensors with host_sync "log")
        self._last: tuple[float | Tensor, float | Tensor] = (1.0, 0.0)
        self._known_blocks = -1  # number of layers found when the layout was last checked
        self._warned: set[str] = set()
        self._warn_unsupported()  # layers of a model given whole are known now

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        return self.state[p]

    # -- statistics ---------------------------------------------------------------------------
    @contextmanager
    def record_statistics(self) -> Iterator[None]:
        """Record K-FAC statistics from the backward passes run inside this context."""
        try:
            with self._capture.recording():
                yield
        except BaseException:
            self._capture.take_records()  # a failed backward pass: its records are dropped
            raise
        self._factors.add(self._capture.take_records())

    def fisher_backward(self, fisher_loss: Tensor, retain_graph: bool = True) -> None:
        """Record statistics from ``fisher_loss``, back-propagating only what they need.

        Same statistics as ``with opt.record_statistics(): fisher_loss.backward()``, but the
        backward pass stops at the first supported layers and computes no weight gradients
        (``.grad`` is left untouched), and nothing runs when ``statistics_due`` is ``False``.
        """
        cap = self._capture
        if not cap.armed:
            return
        if not fisher_loss.requires_grad:
            raise ValueError(
                "fisher_backward: the Fisher loss has no graph (was its forward pass run under "
                "torch.no_grad()?)"
            )
        log = cap.take_forward_log()
        # Stop at the outputs of the first layers; where an in-place op changed such an output
        # since (its hook sits on the old version), go through the layer's weight instead.
        roots = [
            c.output if c.output._version == c.version else c.block.weight for c in log if c.is_root
        ]
        with self.record_statistics():
            if roots:
                torch.autograd.grad(fisher_loss, roots, retain_graph=True, allow_unused=True)
            seen = cap.recorded_blocks()
            missing = list(dict.fromkeys(c.block for c in log if c.block not in seen))
            if missing:  # layers behind untracked parameters: reach them through their weights
                with cap.restricted_to(missing):
                    torch.autograd.grad(
                        fisher_loss,
                        [b.weight for b in missing],
                        retain_graph=retain_graph,
                        allow_unused=True,
                    )

    @property
    def statistics_due(self) -> bool:
        """Whether the next ``record_statistics()`` records (``factor_update_interval``).

        Callers may skip building and back-propagating the Fisher loss when it is ``False``.
        """
        return self._capture.armed

    @property
    def blocks(self) -> list[Block]:
        """The layers found so far, as curvature blocks."""
        return self._capture.all_blocks()

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, *, kl: KLMeasure | None = None
    ) -> float | None:
        """Precondition, scale by the trust region's ν, apply momentum and update.

        Statistics recorded since the last step are folded in first, and the factors are
        re-decomposed every ``inverse_update_interval`` steps (and when a layer gets its first
        factors). A non-finite gradient or update skips the step (counted, warned once).

        ``kl``: with ``kl_guard`` set, the measured KL(π_old ‖ π_new) of the batch at the
        parameters as they are when it is called (:mod:`rl_kfac.kl_guard`); the step is shrunk or
        undone when it exceeds ``kl_guard · kl_clip``. Without it, the function given to
        :meth:`check_next_step` is used, if any (training loops that call ``step()`` themselves).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measure, self._next_kl = kl if kl is not None else self._next_kl, None
        if self.kl_guard is None or measure is None:
            self._take_step()
            return loss
        params = [p for g in self.param_groups for p in g["params"]]
        snapshot = Snapshot(params, self._buffers(params))
        self._take_step()
        assert self.kl_clip is not None  # checked with kl_guard
        result = backtrack(
            snapshot,
            lambda: self._buffers(params),
            lambda: self._measured(measure),
            self.kl_guard * self.kl_clip,
            self.kl_guard_backtracks,
        )
        self._guarded = result
        if result.rejected:
            self._rejected_steps += 1
            self._rejected_unread += 1
        return loss

    def check_next_step(self, kl: KLMeasure) -> None:
        """Guard the next :meth:`step` with ``kl`` (as ``step(kl=kl)``), for loops that call
        ``step()`` themselves (Stable-Baselines3's): set it after the forward pass the step's
        gradient comes from. Used once; ignored without ``kl_guard``."""
        self._next_kl = kl

    def pop_rejected_steps(self) -> int:
        """Steps the KL guard shrank or undid since the last call (a damping controller's
        signal: :func:`rl_kfac.actor_critic.adapt_damping_to_kl`)."""
        count, self._rejected_unread = self._rejected_unread, 0
        return count

    def _measured(self, measure: KLMeasure) -> float:
        """``measure()``, averaged over ranks so that every rank keeps the same step."""
        value = measure()
        if self.communicator is None:
            return float(value)
        from rl_kfac.distributed import average_scalar  # torch.distributed only when used

        return average_scalar(value, self.communicator)

    def _buffers(self, params: list[Tensor]) -> list[Tensor | None]:
        return [self.state[p].get("momentum_buffer") if p in self.state else None for p in params]

    def _take_step(self) -> None:
        layout = self._prepare()
        directions, quads = [], []
        for group, lay in zip(self.param_groups, layout):
            pairs, quad = self._precondition(group, lay)
            directions.append(pairs)
            quads.append(quad)
        self._steps += 1
        self._capture.arm(self._steps % self.factor_update_interval == 0)
        self._guarded = None
        lrs = [g["lr"] for g in self.param_groups]
        if not all(0 <= lr <= MAX_LR for lr in lrs):  # e.g. a schedule gone wrong
            self._skip(f"learning rate {lrs} is not in [0, {MAX_LR:g}]", key="lr")
            return
        device = self.param_groups[0]["params"][0].device
        if self.host_sync == "log" or (self.host_sync == "auto" and device.type == "cuda"):
            self._step_on_device([q.to(device) for q in quads], layout, directions)
            return
        quad_values = torch.stack([q.to(quads[0].device) for q in quads]).tolist()  # one sync
        if not all(math.isfinite(q) for q in quad_values):
            self._skip(NONFINITE_STEP)
            return

        nus = [1.0] * len(quad_values)
        for radius, members in self._trust_regions():
            weighted = sum(
                self._clip_lr(self.param_groups[i]) ** 2 * max(quad_values[i], 0.0) for i in members
            )
            nu = min(1.0, math.sqrt(radius / weighted)) if weighted > 0 else 1.0
            for i in members:
                nus[i] = nu
        for group, lay, (params, dirs), nu in zip(self.param_groups, layout, directions, nus):
            _apply(group, lay, params, dirs, nu, self._param_state)
        self._last = (nus[self._main_group], sum(quad_values))

    def _trust_regions(self) -> list[tuple[float, list[int]]]:
        """Each finite trust region's radius and the indices of the groups it scales: the
        optimizer's ``kl_clip`` over the groups that set none of their own, and each group's own.
        """
        shared = [i for i, g in enumerate(self.param_groups) if "kl_clip" not in g]
        regions = [(self.kl_clip, shared)] if shared else []
        regions += [(g["kl_clip"], [i]) for i, g in enumerate(self.param_groups) if "kl_clip" in g]
        return [(c, members) for c, members in regions if c is not None and c < math.inf]

    @property
    def _main_group(self) -> int:
        """The first group the optimizer's own trust region scales (its ν is the logged one)."""
        return next((i for i, g in enumerate(self.param_groups) if "kl_clip" not in g), 0)

    def _clip_lr(self, group: dict[str, Any]) -> float:
        """The learning rate ν is computed at (``kl_clip_lr``)."""
        if self.kl_clip_lr == "initial":
            return float(group.get("initial_lr", group["lr"]))
        return float(group["lr"])

    @property
    def lr_fraction(self) -> float:
        """The first group's ``lr / initial_lr`` under ``kl_clip_lr="initial"``, else 1: the
        factor a schedule has scaled clipped steps by (their KL by its square)."""
        group = self.param_groups[0]
        clip_lr = self._clip_lr(group)
        return float(group["lr"] / clip_lr) if clip_lr > 0 else 1.0

    def _skip(self, why: str, key: str = "step") -> None:
        self._skipped_steps.value += 1
        self._warn_once(key, f"{why}: K-FAC step skipped")
        self._last = (math.nan, math.nan)

    def _step_on_device(
        self,
        quads: list[Tensor],
        layout: list[GroupLayout],
        directions: list[tuple[list[Tensor], list[Tensor]]],
    ) -> None:
        """The end of :meth:`step` without a host read: ν and the skip decision as tensors."""
        wide = torch.float32 if quads[0].device.type == "mps" else torch.float64  # mps: no fp64
        q = torch.stack(quads).to(wide)
        finite = q.isfinite().all()
        one = torch.ones((), dtype=q.dtype, device=q.device)
        nus = [one] * len(quads)
        for radius, members in self._trust_regions():
            weighted = sum(
                self._clip_lr(self.param_groups[i]) ** 2 * q[i].clamp(min=0) for i in members
            )
            assert isinstance(weighted, Tensor)
            nu = torch.where(weighted > 0, (radius / weighted).sqrt().clamp(max=1.0), one)
            for i in members:
                nus[i] = nu
        for group, lay, (params, dirs), nu in zip(self.param_groups, layout, directions, nus):
            _apply_gated(group, lay, params, dirs, nu, finite, self._param_state)
        self._skipped_steps.add_flag(~finite)
        main = nus[self._main_group]
        self._last = (torch.where(finite, main, math.nan), torch.where(finite, q.sum(), math.nan))

    def _prepare(self) -> list[GroupLayout]:
        """Fold in pending statistics, refresh eigenbases when due; the layout to step with."""
        if self.statistics == "empirical":
            self._factors.add(self._capture.take_records())
        self._factors.finish()
        self._check_setup()
        due = self._steps % self.inverse_update_interval == 0
        self._warn_eig_failures(self._curvature.refresh(self.blocks, due))
        return self._curvature.layout(self.param_groups, self.blocks)

    def _precondition(
        self, group: dict[str, Any], lay: GroupLayout
    ) -> tuple[tuple[list[Tensor], list[Tensor]], Tensor]:
        """Preconditioned directions ``v`` (with their params) and ``Σ ⟨v, g⟩`` of one group."""
        wd, damping = group["weight_decay"], group["damping"]
        params: list[Tensor] = []
        dirs: list[Tensor] = []
        quad = torch.zeros((), dtype=self.factor_dtype, device=group["params"][0].device)
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
            grads = [g for p in plain if (g := p.grad) is not None]
            if wd:
                grads = list(torch._foreach_add(grads, plain, alpha=wd))
            sq = torch.stack(torch._foreach_norm(grads)).to(quad.dtype).square().sum()
            fisher = group.get("fisher_diagonal")
            if fisher is not None:  # F = f·I exactly: v = g / (f + λ), ⟨v, g⟩ = |g|² / (f + λ)
                grads = list(torch._foreach_div(grads, fisher + damping))
                sq = sq / (fisher + damping)
            quad = quad + sq
            params += plain
            dirs += grads
        return (params, dirs), quad

    # -- bookkeeping --------------------------------------------------------------------------
    def _check_setup(self) -> None:
        cap = self._capture
        found = len(cap.all_blocks())
        if cap.discovering and found:
            cap.end_discovery()
        self._warn_unsupported()
        if self._known_blocks == found:
            return
        self._known_blocks = found
        self._curvature.invalidate()  # layers were found since the last layout
        missing = [b.name for b in self.blocks if not self._factors.has(b)]
        if missing:
            self._warn_once(
                "missing",
                f"no K-FAC statistics yet for {missing}: plain gradient until "
                "record_statistics() sees them (statistics='empirical' records them from the "
                "training loss instead)",
            )

    @property
    def damping(self) -> float:
        """λ of the first parameter group (what damping controllers read)."""
        return float(self.param_groups[0]["damping"])

    def set_damping(self, value: float) -> None:
        """Set λ of every parameter group."""
        _check(0 < value < math.inf, f"damping must be > 0 and finite, got {value}")
        for group in self.param_groups:
            group["damping"] = value

    def set_kl_clip(self, value: float) -> None:
        """Set the trust-region radius ``c`` (a controller's, e.g.
        :class:`rl_kfac.trust_region.KLClipController`); saved in :meth:`state_dict`."""
        _check(self.kl_clip is not None, "kl_clip is None: there is no trust region to set")
        _check(0 < value < math.inf, f"kl_clip must be > 0 and finite, got {value}")
        self.kl_clip = value

    @property
    def counters(self) -> dict[str, int]:
        """Steps, statistics and inverse updates, and what was skipped or failed (a copy)."""
        if self._skipped_steps.settle():  # host_sync "log": the step's flags read here
            self._warn_once("step", f"{NONFINITE_STEP}: K-FAC step skipped")
        skipped_statistics = self._factors.skipped  # first: it settles the device's count
        return {
            "steps": self._steps,
            "statistics_updates": self._factors.updates,
            "inverse_updates": self._curvature.updates,
            "skipped_steps": self._skipped_steps.value,
            "skipped_statistics": skipped_statistics,
            "eig_failures": self._curvature.failures,
            "rejected_steps": self._rejected_steps,
        }

    @property
    def diagnostics(self) -> Diagnostics:
        """The last step's ν, quadratic form and KL-guard result, the damping λ now, and the
        counters."""
        nu, quad = self._last
        guard = self._guarded
        kl, kept = (math.nan, 1.0) if guard is None else (guard.kl, guard.kept)
        return Diagnostics(float(nu), float(quad), self.damping, kl, kept, **self.counters)

    def _warn_unsupported(self) -> None:
        for message in self._capture.unsupported:
            self._warn_once(message, message + "; its parameters get the plain gradient")

    def _warn_once(self, key: str, message: str) -> None:
        warn_once(self._warned, key, message)

    def synchronize(self) -> None:
        """Finish the work in flight: fold in the cross-rank factor average and swap in the
        background eigendecomposition, as the next step would (nothing happens in between).

        With a communicator, call it on every rank before leaving the process group: an
        all-reduce left pending would be torn down with the interpreter, and gloo's teardown of
        it can abort the process (SIGABRT).
        """
        self._factors.finish()
        self._warn_eig_failures(self._curvature.finish())

    def _warn_eig_failures(self, names: list[str]) -> None:
        for name in names:
            self._warn_once(f"eig {name}", f"eigendecomposition failed for {name}; kept last basis")

    def remove_hooks(self) -> None:
        """Detach all hooks from the model (the optimizer then only takes plain-gradient steps)."""
        self._capture.remove()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.synchronize()
        sd = super().state_dict()
        sd["kfac"] = {k: torch.tensor(v) for k, v in self.counters.items()}  # settles them
        if self.kl_clip is not None:  # a controller may have moved it
            sd["kfac"]["kl_clip"] = torch.tensor(self.kl_clip, dtype=torch.float64)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synchronize()  # nothing in flight may land on the loaded state
        state_dict = dict(state_dict)
        counters = state_dict.pop("kfac", None)
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("A", "G", "QA", "eA", "QG", "eG", "pi"):
                if key in state:
                    state[key] = state[key].to(self.factor_dtype)
        if counters is not None:
            if "kl_clip" in counters and self.kl_clip is not None:
                self.kl_clip = float(counters["kl_clip"])
            c = {k: int(counters.get(k, 0)) for k in COUNTERS}
            self._steps, self._skipped_steps = c["steps"], LazyCount(c["skipped_steps"])
            self._factors.load_counters(c["statistics_updates"], c["skipped_statistics"])
            self._curvature.load_counters(c["inverse_updates"], c["eig_failures"])
            self._rejected_steps = c["rejected_steps"]
        self._capture.arm(self._steps % self.factor_update_interval == 0)
        self._curvature.invalidate()

    def __getstate__(self) -> dict[str, Any]:
        self.synchronize()  # before torch copies ``state``: it must hold the results
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if k not in state})
        return state

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"KFAC(lr={g['lr']}, momentum={g['momentum']}, damping={g['damping']}, "
            f"weight_decay={g['weight_decay']}, kl_clip={self.kl_clip}, "
            f"kl_clip_lr={self.kl_clip_lr!r}, "
            f"stat_decay={self.stat_decay}, factor_update_interval={self.factor_update_interval}, "
            f"inverse_update_interval={self.inverse_update_interval}, "
            f"damping_mode={self.damping_mode!r}, conv_approx={self.conv_approx!r}, "
            f"recurrent_approx={self.recurrent_approx!r}, "
            f"factor_dtype={self.factor_dtype}, statistics={self.statistics!r}, "
            f"statistics_rows={self.statistics_rows}, inverse_mode={self.inverse_mode!r}, "
            f"host_sync={self.host_sync!r}, kl_guard={self.kl_guard}, "
            f"kl_guard_backtracks={self.kl_guard_backtracks}, "
            f"blocks={len(self.blocks)})"
        )


NONFINITE_STEP = "non-finite gradient or update"  # one warning, host or device detected
COUNTERS = (
    "steps",
    "statistics_updates",
    "inverse_updates",
    "skipped_steps",
    "skipped_statistics",
    "eig_failures",
    "rejected_steps",
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _gather(views: list[Tensor], params: list[Tensor]) -> None:
    """Copy each parameter's gradient into its view (zero where the gradient is ``None``)."""
    dst, src = [], []
    for v, p in zip(views, params):
        if p.grad is None:
            v.zero_()
        else:
            dst.append(v)
            src.append(p.grad)
    if dst:
        torch._foreach_copy_(dst, src)


def _apply(
    group: dict[str, Any],
    lay: GroupLayout,
    params: list[Tensor],
    dirs: list[Tensor],
    nu: float,
    state_of: Callable[[Tensor], dict[str, Any]],
) -> None:
    """``buf ← m·buf + ν v``, ``θ ← θ − lr (1 − m) buf`` (``θ ← θ − lr ν v`` without momentum)."""
    lr, mom = group["lr"], group["momentum"]
    if not params:
        return
    if mom == 0:
        torch._foreach_add_(params, dirs, alpha=-lr * nu)
        return
    bufs = lay.momentum_buffers(params, state_of)
    torch._foreach_mul_(bufs, mom)
    torch._foreach_add_(bufs, dirs, alpha=nu)
    torch._foreach_add_(params, bufs, alpha=-lr * (1.0 - mom))


def _apply_gated(
    group: dict[str, Any],
    lay: GroupLayout,
    params: list[Tensor],
    dirs: list[Tensor],
    nu: Tensor,
    finite: Tensor,
    state_of: Callable[[Tensor], dict[str, Any]],
) -> None:
    """:func:`_apply` with ν a tensor, and no change at all where ``finite`` is false."""
    lr, mom = group["lr"], group["momentum"]
    if not params:
        return
    finite, nu = finite.to(params[0].device), nu.to(params[0].device)  # device to device
    dtype = torch.promote_types(params[0].dtype, torch.float32)  # coefficients: no fp16 lr

    def gated(value: float, otherwise: float) -> Tensor:  # made on the device: no copy to it
        return torch.where(
            finite, torch.full((), value, dtype=dtype, device=finite.device), otherwise
        )

    scale = torch.where(finite, nu, 0.0).to(dtype)
    # a skipped step's directions may hold inf/nan, and 0 · inf is nan: zero them first
    steps = [torch.where(finite, d, 0.0) for d in dirs]
    torch._foreach_mul_(steps, scale)
    if mom == 0:
        torch._foreach_mul_(steps, -lr)
        torch._foreach_add_(params, steps)
        return
    bufs = lay.momentum_buffers(params, state_of)
    torch._foreach_mul_(bufs, gated(mom, 1.0))  # a skipped step keeps the buffers
    torch._foreach_add_(bufs, steps)
    torch._foreach_add_(params, torch._foreach_mul(bufs, gated(-lr * (1.0 - mom), 0.0)))
