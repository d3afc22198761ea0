"""PPO-KFAC (Song & Wu 2018): PPO's clipped surrogate, optimised with K-FAC steps.

One update, top to bottom, for ``n_epochs`` passes over shuffled minibatches:
1. forward the minibatch; Fisher loss from actions sampled from the *current* policy + the value
   Gauss-Newton term; K-FAC records its statistics;
2. clipped surrogate − ent_coef · entropy + vf_coef · value loss (optionally clipped);
3. one K-FAC step with the trust-region clip (per minibatch);
4. optional early stop when the minibatch's approximate KL exceeds 1.5 · target_kl.
Afterwards KL(π_old ‖ π_new) on the whole batch drives KL-based damping and the trust-region
radius, and is logged.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from agents.algorithm import KFACAlgorithm, Stats, normalize
from agents.distributions import Distribution
from agents.networks import ActorCritic
from agents.rollout import Batch, evaluate
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


def step_kl(policy: ActorCritic, before: Distribution, mb: Batch) -> Tensor:
    """KL(π before the step ‖ π now) on the minibatch: what the KL guard checks."""
    return before.kl(evaluate(policy, mb)[0]).mean()


def minibatches(batch: Batch, size: int) -> list[Batch]:
    """A random split into minibatches of about ``size`` samples: single samples, or for a
    recurrent policy whole environment sequences (``size // T`` of them, at least one)."""
    device = batch.obs.device
    if batch.starts is None:
        return [batch.rows(idx) for idx in torch.randperm(len(batch), device=device).split(size)]
    steps, n = batch.starts.shape
    envs = torch.randperm(n, device=device).split(max(1, size // steps))
    return [batch.columns(idx) for idx in envs]


class PPOKFAC(KFACAlgorithm):
    def update(self, batch: Batch, progress: float) -> Stats:
        cfg, opt, policy = self.cfg, self.optimizer, self.policy
        lr = self.set_learning_rate(progress)
        with torch.no_grad():
            old_dist, _ = evaluate(policy, batch)
        sums: dict[str, Tensor | float] = {"policy": 0.0, "value": 0.0, "entropy": 0.0}
        steps = 0
        stop = False
        for _ in range(cfg.n_epochs):
            for mb in minibatches(batch, cfg.batch_size):
                dist, values = evaluate(policy, mb)
                record_fisher(opt, dist.fisher_loss, values, cfg.vf_fisher_coef)
                log_probs = dist.log_prob(mb.actions)
                adv = mb.advantages
                if cfg.normalize_advantage is not False and len(mb) > 1:  # null: normalise
                    adv = normalize(adv)
                pg = clipped_surrogate(log_probs, mb.log_probs, adv, cfg.clip_range)
                vl = value_loss(values, mb.values, mb.returns, cfg.clip_range_vf)
                entropy = dist.entropy().mean()
                loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * vl
                self.step_on(loss, lr, kl=functools.partial(step_kl, policy, dist.detach(), mb))
                steps += 1
                sums["policy"] += pg.detach()
                sums["value"] += vl.detach()
                sums["entropy"] += entropy.detach()
                if cfg.target_kl is not None:
                    with torch.no_grad():
                        log_ratio = log_probs - mb.log_probs
                        approx = self.global_mean(((log_ratio.exp() - 1) - log_ratio).mean())
                    if approx > 1.5 * cfg.target_kl:
                        stop = True
                        break
            if stop:
                break
        with torch.no_grad():
            kl = old_dist.kl(evaluate(policy, batch)[0]).mean()
        adapted = self.adapt_to_kl(kl)
        return {
            "train/policy_loss": sums["policy"] / steps,
            "train/value_loss": sums["value"] / steps,
            "train/entropy": sums["entropy"] / steps,
            "train/approx_kl": kl,
            "train/learning_rate": lr,
            "train/n_updates": steps,
            **adapted,
        }
