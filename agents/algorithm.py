"""What ACKTR and PPO-KFAC share: the K-FAC optimizer, the LR schedule, damping adaptation."""

from __future__ import annotations

from torch import Tensor

from agents.config import Config
from agents.networks import ActorCritic
from agents.rollout import Batch
from rl_kfac import KFAC
from rl_kfac.damping import KLDampingController, LevenbergMarquardt

Stats = dict[str, float | Tensor]


class KFACAlgorithm:
    """Base of our agents: ``update(batch, progress)`` runs one update and returns log scalars."""

    def __init__(self, policy: ActorCritic, cfg: Config) -> None:
        self.policy, self.cfg = policy, cfg
        self.optimizer = KFAC(
            policy,
            lr=cfg.lr,
            momentum=cfg.momentum,
            stat_decay=cfg.stat_decay,
            damping=cfg.damping,
            kl_clip=cfg.kl_clip,
            weight_decay=cfg.weight_decay,
            factor_update_interval=cfg.factor_update_interval,
            inverse_update_interval=cfg.inverse_update_interval,
            damping_mode=cfg.damping_mode,  # type: ignore[arg-type]
            conv_approx=cfg.conv_approx,  # type: ignore[arg-type]
        )
        self.kl_damping = (
            KLDampingController(
                cfg.damping_target_kl,
                cfg.damping_rate,
                cfg.damping_max_factor,
                cfg.damping_min,
                cfg.damping_max,
            )
            if cfg.damping_adaptation == "kl"
            else None
        )
        self.lm_damping = (
            LevenbergMarquardt(cfg.lm_omega, cfg.damping_min, cfg.damping_max)
            if cfg.damping_adaptation == "lm"
            else None
        )

    @property
    def damping(self) -> float:
        return float(self.optimizer.param_groups[0]["damping"])

    def set_damping(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["damping"] = value

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

    def kfac_stats(self) -> Stats:
        diag = self.optimizer.diagnostics
        return {
            "kfac/step_scale": diag.get("step_scale", 1.0),
            "kfac/damping": self.damping,
            "kfac/quadratic": diag.get("quadratic", 0.0),
            "kfac/skipped_steps": diag.get("skipped_steps", 0.0),
        }

    def update(self, batch: Batch, progress: float) -> Stats:
        raise NotImplementedError
