"""What ACKTR and PPO-KFAC share: the K-FAC optimizer, the LR schedule, and the damping and
trust-region adaptation from each update's measured KL."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from agents.config import Config
from agents.networks import ActorCritic
from agents.rollout import Batch
from rl_kfac import KFAC
from rl_kfac.actor_critic import adapt_damping_to_kl, adapt_kl_clip, kfac_param_groups
from rl_kfac.damping import KLDampingController, LevenbergMarquardt
from rl_kfac.distributed import Communicator, allreduce_gradients, average_scalar
from rl_kfac.kl_guard import KLMeasure
from rl_kfac.trust_region import KLClipController

Stats = dict[str, float | Tensor]
# Config keys that are KFAC arguments of the same name
KFAC_KEYS = (
    "momentum",
    "stat_decay",
    "damping",
    "kl_clip",
    "kl_clip_lr",
    "weight_decay",
    "factor_update_interval",
    "inverse_update_interval",
    "damping_mode",
    "conv_approx",
    "recurrent_approx",
    "statistics_rows",
    "inverse_mode",
    "kl_guard",
    "kl_guard_backtracks",
)


def normalize(advantages: Tensor) -> Tensor:
    """Zero mean and unit standard deviation over the batch."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def explained_variance(values: Tensor, returns: Tensor) -> Tensor:
    """``1 − Var(returns − values) / Var(returns)``, as SB3 logs it: 1 for a critic that predicts
    the returns, 0 for one no better than their mean, negative for worse; NaN when the returns
    do not vary."""
    var = returns.var(unbiased=False)
    ratio = (returns - values).var(unbiased=False) / var
    return torch.where(var > 0, 1.0 - ratio, torch.full_like(var, float("nan")))  # no host read


class KFACAlgorithm:
    """Base of our agents: ``update(batch, progress)`` runs one update and returns log scalars.

    With a communicator (``torchrun``), each rank updates on its own batch: gradients and K-FAC
    factors are averaged across ranks and every scalar that steers the update (measured KL, LM
    ratio, early stop) is averaged too, so all ranks take the same steps.
    """

    def __init__(self, policy: ActorCritic, cfg: Config, comm: Communicator | None = None) -> None:
        self.policy, self.cfg, self.comm = policy, cfg, comm
        kfac = {key: getattr(cfg, key) for key in KFAC_KEYS}
        if comm is not None and comm.world_size > 1 and kfac["inverse_mode"] == "background":
            # the ranks share the eigendecompositions out among themselves instead
            warnings.warn(
                "inverse_mode 'background' runs in one process; under torchrun the ranks share "
                "the eigendecompositions out in sync mode",
                RuntimeWarning,
                stacklevel=2,
            )
            kfac["inverse_mode"] = "sync"
        critic = policy.value_parameters() if cfg.vf_kl_clip is not None else []
        groups = kfac_param_groups(
            policy, policy.log_std, cfg.log_std_fisher, critic, cfg.vf_kl_clip
        )
        self.optimizer = KFAC(groups, lr=cfg.lr, communicator=comm, model=policy, **kfac)
        self.kl_damping = (
            KLDampingController(
                cfg.damping_target_kl,
                cfg.damping_rate,
                cfg.damping_max_factor,
                cfg.damping_min,
                cfg.damping_max,
                cfg.damping_target_schedule,
                cfg.damping_hold_when_clipped,
            )
            if cfg.damping_adaptation == "kl"
            else None
        )
        self.lm_damping = (
            LevenbergMarquardt(cfg.lm_omega, cfg.damping_min, cfg.damping_max)
            if cfg.damping_adaptation == "lm"
            else None
        )

        self.kl_clip_control: KLClipController | None = None
        if cfg.kl_clip_target is not None:
            assert cfg.kl_clip is not None  # Config.validate: a target needs a radius
            self.kl_clip_control = KLClipController(cfg.kl_clip_target, cfg.kl_clip)

    def __repr__(self) -> str:
        damping = self.kl_damping or self.lm_damping
        return (
            f"{type(self).__name__}(optimizer={self.optimizer}, damping_adaptation={damping}, "
            f"kl_clip_adaptation={self.kl_clip_control})"
        )

    def set_learning_rate(self, progress: float) -> float:
        """Linear decay to 0 at the end of training, or constant; returns the new rate."""
        lr = (
            self.cfg.lr * max(1.0 - progress, 0.0)
            if self.cfg.lr_schedule == "linear"
            else self.cfg.lr
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step_on(
        self,
        loss: Tensor,
        lr: float,
        inputs: list[nn.Parameter] | None = None,
        kl: KLMeasure | None = None,
    ) -> None:
        """Back-propagate ``loss`` (into ``inputs`` only, if given), average gradients over
        ranks, clip, take the K-FAC step (checked by the KL guard with ``kl``, if it is on)."""
        self.optimizer.zero_grad()
        loss.backward(inputs=inputs)
        allreduce_gradients(self.policy.parameters(), self.comm)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        if lr > 0:
            self.optimizer.step(kl=kl)

    def global_mean(self, value: float | Tensor) -> float:
        """``value`` averaged over ranks (itself in a single process)."""
        return average_scalar(value, self.comm)

    def adapt_to_kl(self, kl: Tensor) -> Stats:
        """KL-based damping and trust-region radius from this update's KL(π_old ‖ π_new),
        averaged over ranks (read only when one of them is on); the radius to log, if adapted."""
        if self.kl_damping is None and self.kl_clip_control is None:
            return {}
        kl_mean = self.global_mean(kl)
        if self.kl_damping is not None:
            adapt_damping_to_kl(self.optimizer, self.kl_damping, kl_mean, self.cfg.lr)
        if self.kl_clip_control is None:
            return {}
        return {"kfac/kl_clip": adapt_kl_clip(self.optimizer, self.kl_clip_control, kl_mean)}

    def update(self, batch: Batch, progress: float) -> Stats:
        raise NotImplementedError
