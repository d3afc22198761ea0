"""ACKTR (Wu et al. 2017): A2C whose update is one K-FAC step with the trust-region clip.

One update, top to bottom:
1. one forward pass on the rollout (a recurrent policy: along each env's sequence);
2. Fisher loss = NLL of actions sampled from the current policy + the value head's Gauss-Newton
   term (Gaussian σ = 1, sampled target); K-FAC records its statistics (``fisher_backward``);
3. A2C loss = policy gradient − ent_coef · entropy + vf_coef · MSE(values, returns);
4. one K-FAC step (precondition, trust-region clip ν, momentum);
5. KL(π_old ‖ π_new) on the batch, for logging, KL-based damping and the trust-region radius
   (or the loss after the step, for the Levenberg-Marquardt rule);
6. ``vf_steps`` more K-FAC steps on the value loss alone, into the parameters only the value
   uses (OpenAI baselines' continuous-control ACKTR, ``acktr_cont``, fits its separate critic
   with many K-FAC steps per batch). The policy does not move: momentum and weight decay must
   be 0. These steps count toward ``inverse_update_interval``; the logged ``kfac/step_scale``
   and ``kfac/quadratic`` stay the joint step's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.algorithm import KFACAlgorithm, Stats, normalize
from agents.distributions import Distribution
from agents.rollout import Batch, evaluate
from rl_kfac.actor_critic import adapt_damping_lm, record_fisher


class ACKTR(KFACAlgorithm):
    def a2c_loss(self, dist: Distribution, values: Tensor, batch: Batch) -> tuple[Tensor, ...]:
        entropy = dist.entropy().mean()
        adv = normalize(batch.advantages) if self.cfg.normalize_advantage else batch.advantages
        policy_loss = -(adv * dist.log_prob(batch.actions)).mean()
        value_loss = F.mse_loss(values, batch.returns)
        loss = policy_loss - self.cfg.ent_coef * entropy + self.cfg.vf_coef * value_loss
        return loss, policy_loss, value_loss, entropy

    def update(self, batch: Batch, progress: float) -> Stats:
        cfg, opt = self.cfg, self.optimizer
        lr = self.set_learning_rate(progress)

        dist, values = evaluate(self.policy, batch)
        record_fisher(opt, dist.fisher_loss, values, cfg.vf_fisher_coef)
        loss, policy_loss, value_loss, entropy = self.a2c_loss(dist, values, batch)
        old = dist.detach()
        self.step_on(loss, lr, kl=lambda: old.kl(evaluate(self.policy, batch)[0]).mean())

        with torch.no_grad():
            new_dist, new_values = evaluate(self.policy, batch)
            kl = old.kl(new_dist).mean()
            adapted = self.adapt_to_kl(kl)
            if self.lm_damping is not None and lr > 0:
                actual = self.global_mean(self.a2c_loss(new_dist, new_values, batch)[0] - loss)
                adapt_damping_lm(opt, self.lm_damping, actual, lr)
        # the joint step's ν and quadratic, which the value steps would overwrite (a host read,
        # so only when there are value steps)
        joint: Stats = {}
        if cfg.vf_steps and lr > 0:
            diag = opt.diagnostics
            joint = {"kfac/step_scale": diag.step_scale, "kfac/quadratic": diag.quadratic}
        for _ in range(cfg.vf_steps if lr > 0 else 0):
            values = evaluate(self.policy, batch)[1]
            fitted = cfg.vf_coef * F.mse_loss(values, batch.returns)
            self.step_on(fitted, lr, inputs=self.policy.value_parameters())
        return {
            "train/policy_loss": policy_loss.detach(),
            "train/value_loss": value_loss.detach(),
            "train/entropy": entropy.detach(),
            "train/approx_kl": kl,
            "train/learning_rate": lr,
            **joint,
            **adapted,
        }
