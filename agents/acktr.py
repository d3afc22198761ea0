"""ACKTR (Wu et al. 2017): A2C whose update is one K-FAC step with the trust-region clip.

One update, top to bottom:
1. one forward pass on the rollout;
2. Fisher loss = NLL of actions sampled from the current policy + the value head's Gauss-Newton
   term (Gaussian σ = 1, sampled target); K-FAC records its statistics (``fisher_backward``);
3. A2C loss = policy gradient − ent_coef · entropy + vf_coef · MSE(values, returns);
4. one K-FAC step (precondition, trust-region clip ν, momentum);
5. KL(π_old ‖ π_new) on the batch, for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agents.config import Config
from agents.networks import ActorCritic
from agents.rollout import Batch
from rl_kfac import KFAC
from rl_kfac.fisher import value_fisher_loss


class ACKTR:
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

    def learning_rate(self, progress: float) -> float:
        """``progress`` in [0, 1]: the fraction of total timesteps already used."""
        if self.cfg.lr_schedule == "linear":
            return self.cfg.lr * max(1.0 - progress, 0.0)
        return self.cfg.lr

    def update(self, batch: Batch, progress: float) -> dict[str, float | torch.Tensor]:
        """One ACKTR update; losses come back as device tensors (read them only to log)."""
        cfg, opt = self.cfg, self.optimizer
        lr = self.learning_rate(progress)
        for group in opt.param_groups:
            group["lr"] = lr

        dist, values = self.policy(batch.obs)
        if opt.statistics_due:
            opt.fisher_backward(dist.fisher_loss() + cfg.vf_fisher_coef * value_fisher_loss(values))

        entropy = dist.entropy().mean()
        policy_loss = -(batch.advantages * dist.log_prob(batch.actions)).mean()
        value_loss = F.mse_loss(values, batch.returns)
        loss = policy_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
        opt.zero_grad()
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        if lr > 0:
            opt.step()

        with torch.no_grad():
            new_dist, _ = self.policy(batch.obs)
            approx_kl = dist.detach().kl(new_dist).mean()
        diag = opt.diagnostics
        return {
            "train/policy_loss": policy_loss.detach(),
            "train/value_loss": value_loss.detach(),
            "train/entropy": entropy.detach(),
            "train/approx_kl": approx_kl,
            "train/learning_rate": lr,
            "kfac/step_scale": diag.get("step_scale", 1.0),
            "kfac/damping": diag.get("damping", cfg.damping),
            "kfac/quadratic": diag.get("quadratic", 0.0),
            "kfac/skipped_steps": diag.get("skipped_steps", 0.0),
        }
