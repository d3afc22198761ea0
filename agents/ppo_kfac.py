"""PPO-KFAC (Song & Wu 2018): PPO's clipped surrogate, optimised with K-FAC steps.

One update, top to bottom, for ``n_epochs`` passes over shuffled minibatches:
1. forward the minibatch; Fisher loss from actions sampled from the *current* policy + the value
   Gauss-Newton term; K-FAC records its statistics;
2. clipped surrogate − ent_coef · entropy + vf_coef · value loss (optionally clipped);
3. one K-FAC step with the trust-region clip (per minibatch);
4. optional early stop when the minibatch's approximate KL exceeds 1.5 · target_kl.
Afterwards KL(π_old ‖ π_new) on the whole batch drives KL-based damping and is logged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.algorithm import KFACAlgorithm, Stats, normalize
from agents.rollout import Batch
from rl_kfac.actor_critic import record_fisher


def clipped_surrogate(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
) -> Tensor:
    """``-E[min(r A, clip(r, 1-ε, 1+ε) A)]`` with ``r = exp(log π − log π_old)``."""
    ratio = (log_probs - old_log_probs).exp()
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return -torch.min(ratio * advantages, clipped * advantages).mean()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range_vf: float | None
) -> Tensor:
    """MSE to the returns; with ``clip_range_vf`` the PPO2 pessimistic clipped form."""
    if clip_range_vf is None:
        return (returns - values).pow(2).mean()
    clipped = old_values + (values - old_values).clamp(-clip_range_vf, clip_range_vf)
    return torch.max((returns - values).pow(2), (returns - clipped).pow(2)).mean()


class PPOKFAC(KFACAlgorithm):
    def update(self, batch: Batch, progress: float) -> Stats:
        cfg, opt, policy = self.cfg, self.optimizer, self.policy
        lr = self.set_learning_rate(progress)
        with torch.no_grad():
            old_dist, _ = policy(batch.obs)
        n = len(batch)
        size = min(cfg.batch_size, n)
        sums: dict[str, Tensor | float] = {"policy": 0.0, "value": 0.0, "entropy": 0.0}
        steps = 0
        stop = False
        for _ in range(cfg.n_epochs):
            for idx in torch.randperm(n, device=batch.obs.device).split(size):
                dist, values = policy(batch.obs[idx])
                record_fisher(opt, dist.fisher_loss, values, cfg.vf_fisher_coef)
                log_probs = dist.log_prob(batch.actions[idx])
                adv = batch.advantages[idx]
                if cfg.normalize_advantage is not False and len(idx) > 1:  # null: normalise
                    adv = normalize(adv)
                pg = clipped_surrogate(log_probs, batch.log_probs[idx], adv, cfg.clip_range)
                vl = value_loss(values, batch.values[idx], batch.returns[idx], cfg.clip_range_vf)
                entropy = dist.entropy().mean()
                loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * vl
                self.step_on(loss, lr)
                steps += 1
                sums["policy"] += pg.detach()
                sums["value"] += vl.detach()
                sums["entropy"] += entropy.detach()
                if cfg.target_kl is not None:
                    with torch.no_grad():
                        log_ratio = log_probs - batch.log_probs[idx]
                        approx = self.global_mean(((log_ratio.exp() - 1) - log_ratio).mean())
                    if approx > 1.5 * cfg.target_kl:
                        stop = True
                        break
            if stop:
                break
        with torch.no_grad():
            kl = old_dist.kl(policy(batch.obs)[0]).mean()
        self.adapt_damping(kl)
        return {
            "train/policy_loss": sums["policy"] / steps,
            "train/value_loss": sums["value"] / steps,
            "train/entropy": sums["entropy"] / steps,
            "train/approx_kl": kl,
            "train/learning_rate": lr,
            "train/n_updates": steps,
        }
